"""The optimizer of every trainer: AdamW after global-norm clipping, with a warmup schedule."""

import jax
import ml_collections
import optax

from cpe_jax.errors import UserError

SCHEDULES = ("cosine", "constant")


def make_optimizer(config, schedule="cosine"):
    """AdamW after global-norm clipping, with linear warmup then cosine decay (to lr * min_lr_ratio)
    or a constant rate (the paper's PPO). `config` needs lr, warmup_steps, total_steps, grad_clip,
    weight_decay (and min_lr_ratio for cosine). Returns (optax transform, lr schedule)."""
    warmup = int(config.warmup_steps)
    if schedule == "constant":
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, config.lr, warmup), optax.constant_schedule(config.lr)], [warmup]
        ) if warmup else optax.constant_schedule(config.lr)
    elif schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
            decay_steps=max(config.total_steps, warmup + 1),
            end_value=config.lr * config.get("min_lr_ratio", 0.0),
        )
    else:
        raise UserError(f"config field lr_schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
    clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity()
    return optax.chain(clip, optax.adamw(lr, weight_decay=config.weight_decay)), lr


def optimizer_fields(*, lr, warmup_steps, total_steps, grad_clip, weight_decay, min_lr_ratio=0.0):
    """The fields `make_optimizer` reads, for a trainer whose config spells them otherwise
    (PPO's actor and critic learning rates share one block of the other fields)."""
    return ml_collections.ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, total_steps=total_steps,
                                          grad_clip=grad_clip, weight_decay=weight_decay,
                                          min_lr_ratio=min_lr_ratio))


def with_total_steps(config, total_steps):
    """A copy of `config` whose total_steps is the resolved number (epochs x steps per epoch)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.total_steps = total_steps
    return config


def init_opt_state(tx, params, mesh):
    """`tx.init(params)` with every params-shaped part of the state (Adam's moments) sharded like
    the params and the rest (counts) replicated; plain `jit(tx.init)` would replicate everything."""
    from cpe_jax.sharding import replicated

    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    abstract = jax.eval_shape(tx.init, params)
    shardings = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract, param_shardings,
                                      transform_non_params=lambda _: replicated(mesh))
    return jax.jit(tx.init, out_shardings=shardings)(params)
