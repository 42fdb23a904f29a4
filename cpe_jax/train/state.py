"""Train-state pytrees (donated to the jitted step, saved whole by the checkpointer)."""

import jax
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """One model and its optimizer: SFT, BT, DPO and MiCoTA's student."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array


@struct.dataclass
class ActorCriticState:
    """PPO/CPE: the policy (actor), its critic, the frozen reference and the KL coefficient."""

    policy: nnx.State
    critic: nnx.State
    ref: nnx.State  # an empty dict when KL is off (no reference model is kept)
    policy_opt: optax.OptState
    critic_opt: optax.OptState
    kl_coef: jax.Array  # the KL controller's value (fixed, or adapted towards ppo.kl_target)
    step: jax.Array


def shardings_of(tree):
    """The sharding of every array of a placed pytree (the jit's in/out shardings of the state)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def abstract_of(tree):
    """Shape, dtype and sharding of every array: what a restore places each saved array into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
