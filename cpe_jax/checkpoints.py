"""Orbax checkpoints: standalone model checkpoints (weights + config) and training checkpoints.

A model checkpoint directory holds `cpe_jax_model.json` (the model config and generation config),
`params/` (Orbax, restored straight into the requested sharding) and the tokenizer files, so it
converts back to Hugging Face without the original directory.
"""

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from cpe_jax.errors import UserError, require_path

MODEL_METADATA = "cpe_jax_model.json"


def is_model_checkpoint(path) -> bool:
    return os.path.exists(os.path.join(path, MODEL_METADATA))


def _nested(flat_state):
    """{"layers": {"0": {"attn": {...}}}} with string keys, as Orbax stores trees."""
    tree = {}
    for path, var in flat_state:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = var
    return tree


def save_model(model, out_dir, *, tokenizer_dir=None):
    """Write weights, config and tokenizer files of `model` to `out_dir` (overwrites `params/`)."""
    from cpe_jax.models.qwen2.params import copy_tokenizer_files

    out_dir = os.path.abspath(out_dir)
    _, state = nnx.split(model)
    arrays = _nested((p, v.get_value()) for p, v in nnx.to_flat_state(state))
    params_dir = os.path.join(out_dir, "params")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, arrays, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        metadata = {
            "format": "cpe_jax.qwen2",
            "config": model.config.to_hf_dict(),
            "param_dtype": model.config.param_dtype,
            "generation_config": getattr(model, "generation_config", None),
        }
        with open(os.path.join(out_dir, MODEL_METADATA), "w") as f:
            json.dump(metadata, f, indent=2)
        source = tokenizer_dir or getattr(model, "source_dir", None)
        if source and os.path.isdir(source):
            copy_tokenizer_files(source, out_dir)


def restore_model(path, *, dtype=None, param_dtype=None, mesh=None):
    """Restore a model checkpoint directly into the target sharding (no full host copy)."""
    from cpe_jax.models.qwen2.model import Qwen2Config
    from cpe_jax.models.qwen2.params import abstract_model, default_compute_dtype, param_sharding

    require_path(path, "checkpoint")
    meta_path = os.path.join(path, MODEL_METADATA)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: invalid JSON ({e})") from None
    config = Qwen2Config.from_hf_dict(
        meta["config"],
        source=meta_path,
        dtype=dtype or default_compute_dtype(),
        param_dtype=param_dtype or meta.get("param_dtype", "float32"),
    )
    graphdef, state, _ = abstract_model(config)
    flat = list(nnx.to_flat_state(state))
    stored_dtype = jnp.dtype(meta.get("param_dtype", config.param_dtype))
    target = _nested(
        (p, jax.ShapeDtypeStruct(v.get_value().shape, stored_dtype, sharding=param_sharding(v, mesh)))
        for p, v in flat
    )
    params_dir = os.path.join(os.path.abspath(path), "params")
    require_path(params_dir, "checkpoint parameters")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(params_dir, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UserError(f"{params_dir}: cannot restore parameters ({e})") from None
    for p, var in flat:
        node = restored
        for key in p:
            node = node[str(key)]
        var.set_value(node if node.dtype == jnp.dtype(config.param_dtype) else node.astype(config.param_dtype))
    model = nnx.merge(graphdef, state)
    model.generation_config = meta.get("generation_config")
    model.source_dir = os.path.abspath(path)
    return model
