"""Log-probabilities of chosen tokens: the one gather every trainer, scorer and sampler uses."""

import jax
import jax.numpy as jnp


def token_logprobs(logits, tokens):
    """log softmax(logits)[..., tokens]: logits [..., V], tokens [...] int -> [...] float32.

    Gathers the chosen logit and subtracts logsumexp instead of materialising the whole
    log-softmax (a [B, T, V] array the size of the logits).
    """
    logits = logits.astype(jnp.float32)
    chosen = jnp.take_along_axis(logits, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)
