"""cpe_jax: Critique-Post-Edit reinforcement learning for Qwen2.5 in JAX/Flax."""

__version__ = "0.1.0"


def load_model(path, *, dtype=None, mesh=None, param_dtype=None):
    """Load a Qwen2 model from a Hugging Face directory or an Orbax checkpoint written by cpe_jax.

    Returns a `cpe_jax.models.qwen2.model.Qwen2ForCausalLM` (Flax NNX) whose parameters are
    placed on `mesh` by the logical-axis rules in `cpe_jax.sharding` (one device when None).
    """
    from cpe_jax.models.qwen2.params import load_model as _load

    return _load(path, dtype=dtype, mesh=mesh, param_dtype=param_dtype)
