"""Checks on the numbers a step produced (reported as `numerics/nonfinite`, see `loop.TrainLoop`)."""

import jax.numpy as jnp


def count_nonfinite(*pairs):
    """How many entries of the (values, mask) pairs are NaN or infinite where the mask is set:
    one such log-prob, value or loss poisons every update it reaches, so the run must stop on it."""
    total = jnp.zeros((), jnp.int32)
    for values, mask in pairs:
        total = total + jnp.sum((~jnp.isfinite(values)) & (mask > 0)).astype(jnp.int32)
    return total
