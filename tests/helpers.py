"""Shared test helpers: tiny random transformers Qwen2 checkpoints saved to a directory."""

import os

import numpy as np


def make_hf_qwen2(path, *, seed=0, vocab_size=97, hidden_size=64, intermediate_size=96, layers=2,
                  heads=4, kv_heads=2, head_dim=None, tie=False, rope_theta=10000.0, rms_eps=1e-6,
                  init_scale=0.2, dtype="float32"):
    """Save a random `transformers.Qwen2ForCausalLM` (peaky logits via a large init scale) to `path`."""
    import torch
    import transformers

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        rope_theta=rope_theta, rms_norm_eps=rms_eps, tie_word_embeddings=tie,
        initializer_range=init_scale, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so their conversion is really checked
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens, mask):
    import torch

    with torch.no_grad():
        out = model(torch.tensor(np.asarray(tokens)), attention_mask=torch.tensor(np.asarray(mask).astype(np.int64)))
    return out.logits.float().numpy()


def ragged_batch(vocab_size, lengths, width, *, left_pad, seed=0):
    """Random tokens [B, width] with a validity mask, padded on the left or the right."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab_size, size=(len(lengths), width)).astype(np.int32)
    mask = np.zeros((len(lengths), width), dtype=bool)
    for row, n in enumerate(lengths):
        if left_pad:
            mask[row, width - n:] = True
        else:
            mask[row, :n] = True
    tokens = np.where(mask, tokens, 0).astype(np.int32)
    return tokens, mask


def make_persona_world_policy(path, *, seed=0, **model_kwargs):
    """A tiny random Qwen2 policy with PersonaWorld's locally trained tokenizer, saved to `path`."""
    from cpe_jax.data import persona_world as pw

    tokenizer = pw.train_tokenizer(pw.make_world(0), str(path), vocab_size=1024, n_responses=400)
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, layers=2, heads=4,
                  kv_heads=2, init_scale=0.02)
    kwargs.update(model_kwargs)
    make_hf_qwen2(path, seed=seed, **kwargs)
    return tokenizer


# The paper's sample rows live in shared/ beside the checkout (see ../shared/data/personafeedback_sample).
SHARED_SAMPLE = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                              "shared", "data", "personafeedback_sample"))
