"""The update that trains is the loss `ppo.py` defines, and the training core serves every trainer."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cpe_jax.models.heads import ValueModel
from cpe_jax.models.qwen2.model import Qwen2Config, Qwen2ForCausalLM
from cpe_jax.rl import ppo
from cpe_jax.rl.update import StepSettings, response_logprobs, response_values, train_step, update_losses
from cpe_jax.train.batching import join_micro, split_micro
from cpe_jax.train.state import ActorCriticState

CONFIG = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8)
P, R, E, N = 5, 6, 7, 8


def _settings(**changes):
    base = StepSettings(
        prompt_length=P, response_length=R, edit_prompt_length=E, num_mini_batches=1, micro_batch_size=0,
        epochs=1, clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0, edit_clip_eps_low=None,
        edit_clip_eps_high=None, value_clip=0.5, gamma=1.0, lam=0.95, whiten_advantages=True,
        loss_agg="token-mean", entropy_coef=0.0, kl_in_reward=False, kl_loss=False, kl_kind="k3",
        pi_e_source="recompute")
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def models():
    policy = Qwen2ForCausalLM(CONFIG, rngs=nnx.Rngs(3))
    critic = ValueModel.from_policy(Qwen2ForCausalLM(CONFIG, rngs=nnx.Rngs(4)), rngs=nnx.Rngs(5))
    return nnx.split(policy), nnx.split(critic)


def _random_minibatch(seed):
    """One mini-batch as the update builds it: rows of prompt + response, half of them edits, with
    old log-probs, pi_e, advantages, returns and old values that differ from the models' own."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, CONFIG.vocab_size, (N, P + R)).astype(np.int32)
    attn = np.ones((N, P + R), bool)
    attn[::3, :2] = False  # left padding
    lengths = rng.randint(1, R + 1, N)
    mask = (np.arange(R)[None] < lengths[:, None]).astype(np.float32)
    attn[:, P:] = mask > 0
    noise = lambda: rng.normal(0, 0.3, (N, R)).astype(np.float32)  # noqa: E731
    return dict(tokens=tokens, attn=attn, mask=mask, is_edit=np.arange(N) % 2 == 1,
                old_logprobs=noise() - 4.0, edit_logprobs=noise() - 3.5, ref_logprobs=noise() - 4.2,
                advantages=noise() * 3, returns=noise(), old_values=noise())


@pytest.mark.parametrize("agg", ppo.AGG_MODES)
def test_update_loss_is_ppo_cpe_policy_loss_plus_value_loss(models, agg):
    (pg, ps), (cg, cs) = models
    s = _settings(loss_agg=agg)
    mb = _random_minibatch(0)
    weights = ppo.token_weights(jnp.asarray(mb["mask"]), agg)
    loss, metrics = update_losses(pg, cg, s, ps, cs, mb, weights, jnp.float32(0.0))

    logprobs = response_logprobs(pg, ps, mb["tokens"], mb["attn"], P, R)
    values = response_values(cg, cs, mb["tokens"], mb["attn"], P, R)
    policy_loss, _ = ppo.cpe_policy_loss(logprobs, mb["old_logprobs"], mb["edit_logprobs"], mb["advantages"],
                                         mb["mask"], mb["is_edit"], clip_eps_low=0.2, clip_eps_high=0.28,
                                         dual_clip_c=3.0, agg=agg)
    value_loss, _ = ppo.value_loss(values, mb["old_values"], mb["returns"], mb["mask"], clip=0.5, agg=agg)
    np.testing.assert_allclose(loss, policy_loss + value_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["actor/pg_loss"], policy_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["critic/value_loss"], value_loss, rtol=1e-5)


def test_micro_batch_losses_add_up_to_the_mini_batch_loss(models):
    """With the mini-batch's token weights the micro-batch losses sum to the whole loss (so the
    accumulated gradient is the mini-batch's gradient), for every aggregation."""
    (pg, ps), (cg, cs) = models
    mb = _random_minibatch(1)
    for agg in ppo.AGG_MODES:
        s = _settings(loss_agg=agg, entropy_coef=0.01, kl_loss=True)
        weights = ppo.token_weights(jnp.asarray(mb["mask"]), agg)
        whole, _ = update_losses(pg, cg, s, ps, cs, mb, weights, jnp.float32(0.1))
        parts = split_micro(dict(mb, weights=weights), 4)
        total = sum(update_losses(pg, cg, s, ps, cs, jax.tree.map(lambda x: x[i], parts),
                                  parts["weights"][i], jnp.float32(0.1))[0] for i in range(4))
        np.testing.assert_allclose(total, whole, rtol=1e-5, err_msg=agg)


def test_split_micro_is_strided_and_join_restores_the_order():
    x = np.arange(12).reshape(6, 2)
    parts = split_micro(x, 3)
    np.testing.assert_array_equal(parts[1], x[[1, 4]])
    np.testing.assert_array_equal(join_micro(parts), x)


def _rollout_batch():
    rng = np.random.RandomState(2)
    tokens = lambda shape: rng.randint(1, CONFIG.vocab_size, shape).astype(np.int32)  # noqa: E731
    lengths = lambda: np.arange(R)[None] < rng.randint(2, R + 1, N)[:, None]  # noqa: E731
    return {"prompt_tokens": tokens((N, P)), "prompt_mask": np.ones((N, P), bool),
            "orig_tokens": tokens((N, R)), "orig_mask": lengths(), "edit_tokens": tokens((N, R)),
            "edit_mask": lengths(), "edit_prompt_tokens": tokens((N, E)), "edit_prompt_mask": np.ones((N, E), bool),
            "keep_edit": np.arange(N) % 2 == 0, "orig_valid": np.ones(N, bool),
            "orig_rewards": rng.uniform(-2, 2, N).astype(np.float32),
            "edit_rewards": rng.uniform(-2, 2, N).astype(np.float32)}


@pytest.mark.parametrize("kl_target", [0.0, 0.05])
def test_kl_controller_is_wired_into_the_update(models, kl_target):
    """Fixed: the coefficient stays; adaptive (ppo.kl_target): it moves as
    `ppo.AdaptiveKLController` says for the measured KL to the reference (kl/ref)."""
    (pg, ps), (cg, cs) = models
    s = _settings(kl_in_reward=True, kl_target=kl_target, kl_horizon=100.0)
    sgd = optax.sgd(0.1)
    ref = jax.tree.map(lambda x: x * 1.05, ps)  # a reference the policy has drifted from
    state = ActorCriticState(policy=ps, critic=cs, ref=ref, policy_opt=sgd.init(ps), critic_opt=sgd.init(cs),
                             kl_coef=jnp.float32(0.2), step=jnp.zeros((), jnp.int32))
    new_state, metrics = jax.jit(partial(train_step, pg, cg, sgd, sgd, s))(state, _rollout_batch(), jax.random.key(0))
    assert metrics["kl/ref"] > 0 and metrics["actor/kl_coef"] == pytest.approx(0.2)
    if kl_target:
        expected = ppo.AdaptiveKLController(0.2, target=kl_target, horizon=100.0).update(metrics["kl/ref"], N).value
        assert float(new_state.kl_coef) == pytest.approx(float(expected), rel=1e-6)
        assert float(new_state.kl_coef) != pytest.approx(0.2)
    else:
        assert float(new_state.kl_coef) == pytest.approx(0.2)


def test_kl_target_is_a_config_field(tmp_path):
    from cpe_jax.rl.trainer import default_config
    from cpe_jax.rl.update import settings_from_config

    config = default_config()
    config.ppo.kl_target, config.ppo.kl_horizon = 0.1, 500.0
    s = settings_from_config(config, kl_on=True)
    assert (s.kl_target, s.kl_horizon) == (0.1, 500.0)
    assert isinstance(s.kl_controller(1.0), ppo.AdaptiveKLController)
    assert isinstance(settings_from_config(default_config(), kl_on=True).kl_controller(1.0), ppo.FixedKLController)


def test_flops_per_token_counts_every_matmul_weight():
    """2 FLOPs per weight of every dense layer and the LM head, plus 4*L*H*D per context token."""
    for tied in (True, False):
        config = CONFIG.replace(tie_word_embeddings=tied)
        _, state = nnx.split(Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
        matmul = sum(int(np.prod(v.shape)) for path, v in nnx.to_flat_state(state)
                     if str(path[-1]).endswith("kernel") or path[-1] == "lm_head")
        matmul += config.vocab_size * config.hidden_size if tied else 0  # the tied head reuses the embedding
        heads = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
        assert config.flops_per_token() == 2 * matmul
        assert config.flops_per_token(context=10) == 2 * matmul + 10 * heads
