"""cpe_jax: Critique-Post-Edit reinforcement learning for Qwen2.5 in JAX/Flax."""

__version__ = "0.1.0"


def load_model(path, *, dtype=None, mesh=None, param_dtype=None, attention=None, scan_layers=None,
               progress=False):
    """Load a Qwen2 model from a Hugging Face directory or an Orbax checkpoint written by cpe_jax.

    Returns a `cpe_jax.models.qwen2.model.Qwen2ForCausalLM` (Flax NNX) whose parameters are
    placed on `mesh` by the logical-axis rules in `cpe_jax.sharding` (one device when None).
    `attention` and `scan_layers` set those `Qwen2Config` fields (None: chosen by backend; an
    Orbax checkpoint keeps its stored layer layout). `progress` shows a bar while reading
    safetensors. The one place that tells the two formats apart.
    """
    import os

    from cpe_jax import checkpoints
    from cpe_jax.errors import UserError, require_path
    from cpe_jax.models.qwen2 import params

    require_path(path, "model path")
    if checkpoints.is_model_checkpoint(path):
        model = checkpoints.restore_model(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                             scan_layers=scan_layers)
        if attention is not None:
            model.config = model.config.replace(attention=attention)
        return model
    if os.path.exists(os.path.join(os.fspath(path), "config.json")):
        return params.load_hf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, progress=progress,
                              attention=attention, scan_layers=scan_layers)
    raise UserError(f"{path}: neither a Hugging Face model directory (config.json) nor a cpe_jax checkpoint")
