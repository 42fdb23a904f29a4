"""Scalar heads on a Qwen2 backbone: the PPO critic (a value per token) and the Bradley-Terry reward.

A value model directory is a standalone model checkpoint of the backbone (`cpe_jax.load_model`
reads it as a plain Qwen2) plus `value_head/` and `cpe_jax_value_head.json` beside it.
"""

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from cpe_jax.errors import UserError, require_path
from cpe_jax.models.qwen2.model import Qwen2Config, Qwen2ForCausalLM, positions_from_mask

HEAD_METADATA = "cpe_jax_value_head.json"


class ScalarHead(nnx.Module):
    """hidden [B, T, E] -> scalar [B, T], computed in float32; zero-initialised so a new critic
    predicts 0 and a new reward model starts indifferent."""

    def __init__(self, hidden_size, param_dtype="float32", *, rngs=None):
        self.kernel = nnx.Param(jnp.zeros((hidden_size, 1), param_dtype), logical_axes=("embed", None))
        self.bias = nnx.Param(jnp.zeros((1,), param_dtype), logical_axes=(None,))

    def __call__(self, hidden):
        out = jnp.einsum("bte,eo->bto", hidden.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        return out[..., 0] + self.bias[...].astype(jnp.float32)[0]


class ValueModel(nnx.Module):
    """A Qwen2 backbone (its final hidden states, no logits) and a scalar head."""

    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs = None, backbone=None):
        self.config = config
        self.backbone = backbone if backbone is not None else Qwen2ForCausalLM(config, rngs=rngs)
        self.head = ScalarHead(config.hidden_size, config.param_dtype)

    @classmethod
    def from_policy(cls, model, *, rngs=None):
        """A value model whose backbone is `model` (the paper initialises the critic from the SFT
        policy). The policy object is reused, not copied: pass a separately loaded model."""
        value_model = cls(model.config, backbone=model)
        _place_head_like(value_model, model)
        return value_model

    def __call__(self, tokens, positions=None, mask=None):
        """Per-token values [B, T] (float32)."""
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        if positions is None:
            positions = positions_from_mask(mask)
        _, _, hidden = self.backbone(tokens, positions, None, mask, return_hidden=True, skip_logits=True)
        return self.head(hidden)

    def score(self, tokens, mask):
        """One scalar per row [B]: the value at the row's last real token (any padding side)."""
        return last_token_values(self(tokens, None, mask), mask)


def last_token_values(values, mask):
    """values[b, last index where mask[b] is true]."""
    width = mask.shape[1]
    last = width - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)
    return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]


def _head_sharding(var, mesh):
    from cpe_jax.models.qwen2.params import param_sharding

    return param_sharding(var, mesh)


def _place_head_like(value_model, model):
    """Put the head on the same mesh as the backbone's embedding."""
    sharding = model.embed.get_value().sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None:
        return
    for var in (value_model.head.kernel, value_model.head.bias):
        var.set_value(jax.device_put(var.get_value(), _head_sharding(var, mesh)))


def save_value_model(model: ValueModel, out_dir, *, tokenizer_dir=None, kind="value"):
    """Write the backbone as a model checkpoint and the head beside it (`kind`: "value" or "reward")."""
    from cpe_jax.checkpoints import save_model

    out_dir = os.path.abspath(out_dir)
    save_model(model.backbone, out_dir, tokenizer_dir=tokenizer_dir)
    head = {"kernel": model.head.kernel.get_value(), "bias": model.head.bias.get_value()}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, "value_head"), head, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, HEAD_METADATA), "w") as f:
            json.dump({"format": "cpe_jax.scalar_head", "kind": kind}, f, indent=2)


def is_value_model(path) -> bool:
    return os.path.exists(os.path.join(path, HEAD_METADATA))


def load_value_model(path, *, mesh=None, dtype=None, param_dtype=None, model_class=None) -> ValueModel:
    """Load a directory written by `save_value_model`, every array in its sharding on `mesh`."""
    from cpe_jax.checkpoints import restore_model

    require_path(path, "value model")
    if not is_value_model(path):
        raise UserError(f"{path}: not a value/reward model (no {HEAD_METADATA})")
    backbone = restore_model(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    model = (model_class or ValueModel).from_policy(backbone)
    head_dir = os.path.join(os.path.abspath(path), "value_head")
    target = {
        name: jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype,
                                   sharding=_head_sharding(var, mesh))
        for name, var in (("kernel", model.head.kernel), ("bias", model.head.bias))
    }
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(head_dir, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(f"{head_dir}: cannot restore the value head ({e})") from None
    model.head.kernel.set_value(restored["kernel"])
    model.head.bias.set_value(restored["bias"])
    return model
