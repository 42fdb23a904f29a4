"""The micro-batch splitter of gradient accumulation (and of PPO's mini-batches)."""

import jax
import jax.numpy as jnp


def split_micro(tree, n):
    """[B, ...] -> [n, B/n, ...] taking every n-th row: micro-batch i holds rows i, i+n, i+2n, ...

    Strided, not contiguous, so that each micro-batch of a batch-sharded array spans every data
    shard (a contiguous chunk would sit on B/n of the devices and make XLA reshard it).
    """
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1), tree)


def join_micro(tree):
    """The inverse of `split_micro`: [n, B/n, ...] -> [B, ...] in the original row order."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), tree)


def map_micro(fn, tree, n):
    """fn over n micro-batches one after another (memory of one micro-batch), rows back in order."""
    return join_micro(jax.lax.map(fn, split_micro(tree, n)))
