"""Data, fsdp and tensor parallelism change where the work runs, never the result: SFT and PPO
train steps on 8 devices give the loss and new weights of one device, with the big weights split."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cpe_jax.models.heads import ValueModel
from cpe_jax.models.qwen2.model import Qwen2Config, Qwen2ForCausalLM
from cpe_jax.models.qwen2.params import param_sharding
from cpe_jax.sharding import make_mesh, shard_batch
from cpe_jax.train.optim import init_opt_state
from cpe_jax.train.state import TrainState

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]
CONFIG = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=8)


def _mesh(shape):
    return make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))


def _place(state, mesh):
    """Every parameter on `mesh` by its logical axes (what load_model does); other leaves replicated."""
    def put(var):
        if isinstance(var, nnx.Variable) and "logical_axes" in var.get_metadata():
            return var.replace(jax.device_put(np.asarray(var.get_value()), param_sharding(var, mesh)))
        return var
    return jax.tree.map(put, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _assert_sharded(state, mesh):
    """The MLP kernels are split over fsdp x tensor: each device holds 1/(fsdp*tensor) of them."""
    kernel = state["layers"][0]["mlp"]["gate_kernel"].get_value()
    ways = mesh.shape["fsdp"] * mesh.shape["tensor"]
    assert kernel.addressable_shards[0].data.size * ways == kernel.size
    expected = tuple(a if mesh.shape[a] > 1 else None for a in ("fsdp", "tensor"))
    spec = tuple(kernel.sharding.spec)
    assert spec + (None,) * (2 - len(spec)) == expected


def _assert_same(reference, result, name):
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(result)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


# ---- SFT -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_setup():
    from cpe_jax import sft

    graphdef, params = nnx.split(Qwen2ForCausalLM(CONFIG, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(0)
    mask = np.ones((8, 16), bool)
    mask[::3, 12:] = False
    batch = {"tokens": rng.randint(1, 128, (8, 16)).astype(np.int32), "mask": mask,
             "targets": mask & (rng.rand(8, 16) > 0.3)}
    # SGD with momentum (a params-shaped optimizer state) rather than Adam, whose first step is
    # lr * sign(g) and turns float noise in near-zero gradients into lr-sized differences.
    tx = optax.sgd(0.5, momentum=0.9)

    def run(mesh):
        placed = _place(params, mesh)
        with jax.set_mesh(mesh):
            state = TrainState(params=placed, opt_state=init_opt_state(tx, placed, mesh),
                                   step=jnp.zeros((), jnp.int32))
            step = jax.jit(partial(sft.train_step, graphdef, tx, optax.constant_schedule(0.5), "lm", 2))
            new_state, metrics = step(state, shard_batch(mesh, batch))
        return new_state, metrics

    return run, run(make_mesh({"data": 1}))


@pytest.mark.parametrize("shape", MESHES)
def test_sft_step_is_mesh_invariant(sft_setup, shape):
    run, (reference, ref_metrics) = sft_setup
    mesh = _mesh(shape)
    new_state, metrics = run(mesh)
    _assert_sharded(new_state.params, mesh)
    _assert_sharded(new_state.opt_state[0].trace, mesh)  # the optimizer state is sharded like the params
    assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), abs=1e-5)
    _assert_same(jax.device_get(reference.params), jax.device_get(new_state.params), f"sft {shape}")


# ---- PPO -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ppo_setup():
    from cpe_jax.rl.update import StepSettings, train_step
    from cpe_jax.train.state import ActorCriticState

    policy = Qwen2ForCausalLM(CONFIG, rngs=nnx.Rngs(1))
    critic = ValueModel.from_policy(Qwen2ForCausalLM(CONFIG, rngs=nnx.Rngs(1)), rngs=nnx.Rngs(2))
    policy_graphdef, policy_state = nnx.split(policy)
    critic_graphdef, critic_state = nnx.split(critic)
    n, p_len, r_len, e_len = 8, 6, 5, 9
    rng = np.random.RandomState(0)
    tokens = lambda shape: rng.randint(1, 128, shape).astype(np.int32)  # noqa: E731
    prompt_mask = np.ones((n, p_len), bool)
    prompt_mask[::2, :2] = False  # left padding
    orig_mask = np.arange(r_len)[None] < rng.randint(2, r_len + 1, n)[:, None]
    edit_mask = np.arange(r_len)[None] < rng.randint(2, r_len + 1, n)[:, None]
    batch = {
        "prompt_tokens": tokens((n, p_len)), "prompt_mask": prompt_mask,
        "orig_tokens": tokens((n, r_len)), "orig_mask": orig_mask,
        "edit_tokens": tokens((n, r_len)), "edit_mask": edit_mask,
        "edit_prompt_tokens": tokens((n, e_len)), "edit_prompt_mask": np.ones((n, e_len), bool),
        "keep_edit": np.arange(n) % 2 == 0, "orig_valid": np.ones(n, bool),
        "orig_rewards": rng.uniform(-2, 2, n).astype(np.float32),  # a judge with varied rewards
        "edit_rewards": rng.uniform(-2, 2, n).astype(np.float32),
    }
    settings = StepSettings(
        prompt_length=p_len, response_length=r_len, edit_prompt_length=e_len, num_mini_batches=2,
        micro_batch_size=4, epochs=1, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=None,
        edit_clip_eps_low=None, edit_clip_eps_high=None, value_clip=0.5, gamma=1.0, lam=1.0,
        whiten_advantages=True, loss_agg="token-mean", entropy_coef=0.0, kl_in_reward=False,
        kl_loss=False, kl_kind="k3", pi_e_source="recompute",
    )
    # Plain SGD: Adam's first step is lr * sign(g), which turns float noise in near-zero
    # gradients into lr-sized differences; SGD compares the gradients themselves.
    sgd = optax.sgd(0.5)

    def run(mesh):
        with jax.set_mesh(mesh):
            p, c = _place(policy_state, mesh), _place(critic_state, mesh)
            state = ActorCriticState(policy=p, critic=c, ref={}, policy_opt=sgd.init(p), critic_opt=sgd.init(c),
                               kl_coef=jnp.zeros(()), step=jnp.zeros((), jnp.int32))
            step = jax.jit(partial(train_step, policy_graphdef, critic_graphdef, sgd, sgd, settings))
            return step(state, shard_batch(mesh, batch), jax.random.key(3))

    return run, run(make_mesh({"data": 1}))


@pytest.mark.parametrize("shape", MESHES)
def test_ppo_step_is_mesh_invariant(ppo_setup, shape):
    run, (reference, ref_metrics) = ppo_setup
    mesh = _mesh(shape)
    new_state, metrics = run(mesh)
    _assert_sharded(new_state.policy, mesh)
    _assert_sharded(new_state.critic["backbone"], mesh)
    for key in ("actor/pg_loss", "critic/value_loss"):
        assert float(metrics[key]) == pytest.approx(float(ref_metrics[key]), abs=1e-5), key
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
             zip(jax.tree.leaves(jax.device_get(reference.policy)), jax.tree.leaves(nnx.split(Qwen2ForCausalLM(CONFIG, rngs=nnx.Rngs(1)))[1]))]
    assert max(moved) > 1e-4  # the step really changed the policy
    _assert_same(jax.device_get(reference.policy), jax.device_get(new_state.policy), f"policy {shape}")
    _assert_same(jax.device_get(reference.critic), jax.device_get(new_state.critic), f"critic {shape}")
