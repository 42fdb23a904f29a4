"""What both rollout backends (the host rollout and the fused single-jit step) share: the batch
they hand to the update, the sampler settings, the named RNG streams, the edit metrics and the
FLOP count. One definition each, so the two backends cannot drift apart."""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from cpe_jax import sampling
from cpe_jax.sampling import SampleConfig

# Every random draw of a step comes from fold_in(step key, stream); per-row draws fold the row id in
# after that, so a row's samples do not depend on the batch it is in.
RNG_STREAMS = {"rollout": 0, "edit": 1, "edit_selection": 2, "update": 3, "critique": 4, "edit_critique": 5}


def stream_key(step_key, stream):
    """The key of one named stream (a key of RNG_STREAMS) of a step."""
    return jax.random.fold_in(step_key, RNG_STREAMS[stream])


def row_keys(step_key, stream, row_ids):
    """One key per row of a named stream: [N] keys from [N] row ids (jit-safe)."""
    return sampling.row_keys(stream_key(step_key, stream), row_ids)


@flax.struct.dataclass
class RolloutBatch:
    """The rollout of one step, from either backend: the update's arrays (`rl.update.train_step`'s
    batch) and metrics - host arrays from `rl.rollout.Rollout`, traced ones inside the fused jit -
    plus the responses and edits as text when the backend decoded them (the fused step does not)."""

    arrays: dict
    metrics: dict
    responses: tuple = flax.struct.field(pytree_node=False, default=None)
    edited: tuple = flax.struct.field(pytree_node=False, default=None)


def rollout_sample_configs(config, eos_token_ids, pad_token_id):
    """(policy, edit) SampleConfigs of the `rollout` and `edit` config blocks."""
    r = config.rollout
    policy = SampleConfig(max_new_tokens=r.max_response_length, temperature=float(r.temperature),
                          top_p=float(r.top_p), top_k=int(r.top_k), eos_token_ids=tuple(eos_token_ids),
                          pad_token_id=int(pad_token_id))
    edit = dataclasses.replace(policy, temperature=float(config.edit.get("temperature", r.temperature)))
    return policy, edit


def score_metrics(prefix, scores, valid, mask):
    """`prefix/length` (mean tokens per row) and `prefix/<score>` (mean over valid rows, NaN when
    none is valid) for numpy or traced arrays."""
    valid = jnp.asarray(valid, bool)
    n_valid = jnp.sum(valid)
    out = {f"{prefix}/length": jnp.mean(jnp.sum(jnp.asarray(mask), axis=1).astype(jnp.float32))}
    for name, values in scores.items():
        total = jnp.sum(jnp.where(valid, jnp.nan_to_num(jnp.asarray(values, jnp.float32)), 0.0))
        out[f"{prefix}/{name}"] = jnp.where(n_valid > 0, total / jnp.maximum(n_valid, 1), jnp.nan)
    return out


def edit_selection_metrics(keep_edit, edit_valid, edit_rewards):
    """How many edits were selected for training, the share of invalid ones and the selected
    edits' mean reward (NaN when none was selected)."""
    keep = jnp.asarray(keep_edit, bool)
    n_keep = jnp.sum(keep)
    rewards = jnp.nan_to_num(jnp.asarray(edit_rewards, jnp.float32))
    return {
        "edit/selected": n_keep,
        "edit/selected_frac": jnp.mean(keep.astype(jnp.float32)),
        "edit/invalid_frac": 1.0 - jnp.mean(jnp.asarray(edit_valid, jnp.float32)),
        "edit/selected_reward": jnp.where(n_keep > 0, jnp.sum(jnp.where(keep, rewards, 0.0)) / jnp.maximum(n_keep, 1),
                                          jnp.nan),
    }


def step_flops(model_config, generated_tokens, trained_tokens, epochs, context=0):
    """FLOPs of one PPO/CPE step: sampling the generated tokens (forward) and `epochs` updates of
    the trained tokens through the policy and its critic (forward + backward, 3x forward each)."""
    per_token = model_config.flops_per_token(context)
    return float(per_token) * (float(generated_tokens) + 2 * 3 * float(trained_tokens) * epochs)


def host_floats(metrics):
    """Metrics as Python floats (the update's and a rollout's metrics are replicated scalars)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

