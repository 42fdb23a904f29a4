"""PPO math against plain NumPy loops on random masked inputs with holes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpe_jax.errors import UserError
from cpe_jax.rl import ppo

AGGS = ppo.AGG_MODES


def random_batch(seed, batch=5, time=9):
    """Random token arrays with a mask that has left/right padding, holes and one empty row."""
    rng = np.random.default_rng(seed)
    mask = (rng.random((batch, time)) < 0.7).astype(np.float32)
    mask[0, 3:6] = 0.0  # a hole in the middle
    mask[0, :3] = 1.0
    mask[0, 6:] = 1.0
    mask[-1] = 0.0  # a fully masked row (an unselected edit)
    data = dict(
        mask=mask,
        rewards=rng.normal(size=(batch, time)).astype(np.float32),
        values=rng.normal(size=(batch, time)).astype(np.float32),
        advantages=rng.normal(size=(batch, time)).astype(np.float32),
        logprobs=(-rng.random((batch, time)) * 3).astype(np.float32),
        old_logprobs=(-rng.random((batch, time)) * 3).astype(np.float32),
        returns=rng.normal(size=(batch, time)).astype(np.float32),
    )
    data["old_values"] = data["values"] + rng.normal(size=(batch, time)).astype(np.float32)
    return data


def poison(x, mask):
    """Put NaN where the mask is 0: masked positions must never leak."""
    return np.where(mask > 0, x, np.nan).astype(np.float32)


def pad_columns(x, extra, value=np.nan):
    return np.concatenate([x, np.full((x.shape[0], extra), value, np.float32)], axis=1)


# ---------------------------------------------------------------------------------- references


def gae_reference(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's valid tokens only (the holes squeezed out)."""
    advantages = np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            advantages[b, t] = next_adv
    return advantages


def aggregate_reference(loss, mask, agg):
    if agg == "token-mean":
        total, count = 0.0, 0
        for b in range(loss.shape[0]):
            for t in range(loss.shape[1]):
                if mask[b, t]:
                    total += loss[b, t]
                    count += 1
        return total / count
    rows = []
    for b in range(loss.shape[0]):
        vals = [loss[b, t] for t in range(loss.shape[1]) if mask[b, t]]
        if vals:
            rows.append(sum(vals) if agg == "seq-mean-token-sum" else sum(vals) / len(vals))
    return sum(rows) / len(rows)


def ppo_token_reference(logp, old, adv, eps_low, eps_high, dual_c):
    ratio = np.exp(logp - old)
    clipped_ratio = min(max(ratio, 1 - eps_low), 1 + eps_high)
    loss = max(-adv * ratio, -adv * clipped_ratio)
    if dual_c is not None and adv < 0:
        loss = min(loss, -adv * dual_c)
    return loss


def edit_token_reference(logp, edit_logp, adv, eps_low, eps_high):
    ratio = np.exp(logp - edit_logp)
    if eps_low is None:
        return -adv * ratio
    clipped_ratio = min(max(ratio, 1 - eps_low), 1 + eps_high)
    return max(-adv * ratio, -adv * clipped_ratio)


def per_token(fn, *arrays):
    out = np.zeros(arrays[0].shape, np.float64)
    for index in np.ndindex(arrays[0].shape):
        out[index] = fn(*(float(a[index]) for a in arrays))
    return out


# ---------------------------------------------------------------------------------------- GAE


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.5), (1.0, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gae_matches_loop_with_holes(gamma, lam, seed):
    d = random_batch(seed)
    adv, ret = ppo.gae(poison(d["rewards"], d["mask"]), d["values"], d["mask"], gamma, lam)
    want = gae_reference(d["rewards"], d["values"], d["mask"], gamma, lam)
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want + d["values"], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[d["mask"] == 0] == 0)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = np.array([[0.0, 0.0, 7.0, 0.0, 2.0, 0.0]], np.float32)
    values = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], np.float32)
    mask = np.array([[1, 1, 1, 0, 1, 0]], np.float32)  # hole at 3, padding at 5
    adv, _ = ppo.gae(rewards, values, mask, 1.0, 1.0)
    np.testing.assert_allclose(adv, [[8.0, 7.0, 6.0, 0.0, -3.0, 0.0]], atol=1e-6)


def test_gae_ignores_extra_padding_columns():
    d = random_batch(3)
    adv, ret = ppo.gae(d["rewards"], d["values"], d["mask"], 0.99, 0.9)
    padded_mask = pad_columns(d["mask"], 4, 0.0)
    adv2, ret2 = ppo.gae(pad_columns(d["rewards"], 4), pad_columns(d["values"], 4, 3.0),
                         padded_mask, 0.99, 0.9)
    np.testing.assert_allclose(adv2[:, :-4], adv, atol=1e-6)
    valid = d["mask"] > 0
    np.testing.assert_allclose(np.asarray(ret2)[:, :-4][valid], np.asarray(ret)[valid], atol=1e-6)


def test_last_token_rewards_uses_last_valid_token():
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], np.float32)
    out = ppo.last_token_rewards(np.array([2.0, 5.0, -1.0]), mask)
    want = np.zeros((3, 5), np.float32)
    want[0, 3], want[2, 0] = 2.0, -1.0
    np.testing.assert_array_equal(out, want)


# ------------------------------------------------------------------------------- whitening, agg


def test_masked_mean_and_whiten():
    d = random_batch(4)
    x, mask = poison(d["advantages"], d["mask"]), d["mask"]
    valid = d["advantages"][mask > 0]
    np.testing.assert_allclose(ppo.masked_mean(x, mask), valid.mean(), rtol=1e-5)
    np.testing.assert_allclose(ppo.masked_mean(x, mask, axis=-1)[-1], 0.0)  # empty row
    white = np.asarray(ppo.masked_whiten(x, mask))
    np.testing.assert_allclose(white[mask > 0], (valid - valid.mean()) / valid.std(), rtol=1e-4,
                               atol=1e-5)
    assert np.all(white[mask == 0] == 0)
    kept = np.asarray(ppo.masked_whiten(x, mask, shift_mean=False))[mask > 0]
    np.testing.assert_allclose(kept, (valid - valid.mean()) / valid.std() + valid.mean(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("agg", AGGS)
def test_aggregate_matches_loop(agg):
    d = random_batch(5)
    got = ppo.aggregate(poison(d["rewards"], d["mask"]), d["mask"], agg)
    np.testing.assert_allclose(got, aggregate_reference(d["rewards"], d["mask"], agg), rtol=1e-5)


def test_unknown_agg_is_a_user_error():
    with pytest.raises(UserError, match="loss_agg"):
        ppo.aggregate(jnp.ones((2, 2)), jnp.ones((2, 2)), "sum")


# -------------------------------------------------------------------------------- policy losses


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("eps_low,eps_high,dual_c", [(0.2, 0.2, None), (0.1, 0.3, None),
                                                     (0.2, 0.28, 3.0)])
def test_policy_loss_matches_loop(agg, eps_low, eps_high, dual_c):
    d = random_batch(6)
    m = d["mask"]
    loss, metrics = ppo.policy_loss(poison(d["logprobs"], m), d["old_logprobs"],
                                    poison(d["advantages"], m), m, clip_eps_low=eps_low,
                                    clip_eps_high=eps_high, dual_clip_c=dual_c, agg=agg)
    tokens = per_token(functools.partial(ppo_token_reference, eps_low=eps_low, eps_high=eps_high,
                                         dual_c=dual_c),
                       d["logprobs"], d["old_logprobs"], d["advantages"])
    np.testing.assert_allclose(loss, aggregate_reference(tokens, m, agg), rtol=1e-5, atol=1e-6)
    ratio = np.exp(d["logprobs"] - d["old_logprobs"])
    unclipped = -d["advantages"] * ratio
    clipped = -d["advantages"] * np.clip(ratio, 1 - eps_low, 1 + eps_high)
    np.testing.assert_allclose(metrics["clip_fraction"], (clipped > unclipped)[m > 0].mean(),
                               rtol=1e-6)
    log_ratio = (d["logprobs"] - d["old_logprobs"])[m > 0]
    np.testing.assert_allclose(metrics["ppo_kl"], np.mean(np.exp(log_ratio) - 1 - log_ratio),
                               rtol=1e-5)


def grad_wrt_logprob(loss_fn, logprob, reference_logprob, advantage):
    """d loss / d logprob for a single token."""
    one = jnp.ones((1, 1))

    def f(lp):
        return loss_fn(lp * one, reference_logprob * one, advantage * one, one)[0]

    return float(jax.grad(f)(logprob))


@pytest.mark.parametrize("advantage,log_ratio,expect_gradient", [
    (1.0, np.log(1.3), False),   # A > 0, ratio above 1 + eps: clipped, no push further
    (1.0, np.log(1.1), True),    # inside the range
    (1.0, np.log(0.5), True),    # A > 0, ratio below 1 - eps: unclipped side, keeps gradient
    (-1.0, np.log(0.7), False),  # A < 0, ratio below 1 - eps: clipped
    (-1.0, np.log(1.5), True),   # A < 0, ratio above 1 + eps: pessimistic, keeps gradient
])
def test_ppo_clip_boundaries(advantage, log_ratio, expect_gradient):
    grad = grad_wrt_logprob(ppo.policy_loss, float(log_ratio), 0.0, advantage)
    assert (grad != 0.0) == expect_gradient
    if expect_gradient:
        np.testing.assert_allclose(grad, -advantage * np.exp(log_ratio), rtol=1e-5)


def test_asymmetric_eps_and_dual_clip_values():
    one = np.ones((1, 1), np.float32)

    def loss(log_ratio, adv, **kw):
        return float(ppo.policy_loss(log_ratio * one, 0 * one, adv * one, one, **kw)[0])

    # eps_high = 0.28 lets a positive-advantage ratio of 1.25 through, eps_high = 0.2 does not.
    assert loss(np.log(1.25), 1.0, clip_eps_high=0.28) == pytest.approx(-1.25, rel=1e-5)
    assert loss(np.log(1.25), 1.0, clip_eps_high=0.2) == pytest.approx(-1.2, rel=1e-5)
    # Negative advantage, ratio 10: plain PPO gives 10 * 2, dual-clip caps it at 3 * 2.
    assert loss(np.log(10.0), -2.0) == pytest.approx(20.0, rel=1e-5)
    assert loss(np.log(10.0), -2.0, dual_clip_c=3.0) == pytest.approx(6.0, rel=1e-5)
    assert loss(np.log(10.0), 2.0, dual_clip_c=3.0) == pytest.approx(-2.4, rel=1e-5)
    with pytest.raises(UserError, match="dual_clip_c"):
        loss(0.0, 1.0, dual_clip_c=0.5)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("eps", [None, (0.2, 0.2), (0.5, 1.0)])
def test_edited_policy_loss_matches_loop(agg, eps):
    d = random_batch(7)
    m = d["mask"]
    eps_low, eps_high = eps if eps else (None, None)
    loss, _ = ppo.edited_policy_loss(poison(d["logprobs"], m), poison(d["old_logprobs"], m),
                                     d["advantages"], m, clip_eps_low=eps_low,
                                     clip_eps_high=eps_high, agg=agg)
    tokens = per_token(functools.partial(edit_token_reference, eps_low=eps_low, eps_high=eps_high),
                       d["logprobs"], d["old_logprobs"], d["advantages"])
    np.testing.assert_allclose(loss, aggregate_reference(tokens, m, agg), rtol=1e-5, atol=1e-6)


def test_edited_loss_gradient_is_minus_a_times_ratio_and_clips_past_the_range():
    unclipped = functools.partial(ppo.edited_policy_loss)
    clipped = functools.partial(ppo.edited_policy_loss, clip_eps_low=0.2, clip_eps_high=0.2)
    # pi_theta / pi_e = 0.25: the edit context made the tokens likelier; A > 0 pushes them up.
    grad = grad_wrt_logprob(unclipped, np.log(0.25), 0.0, 2.0)
    np.testing.assert_allclose(grad, -2.0 * 0.25, rtol=1e-5)
    np.testing.assert_allclose(grad_wrt_logprob(clipped, np.log(0.25), 0.0, 2.0), grad, rtol=1e-5)
    assert grad_wrt_logprob(clipped, np.log(1.5), 0.0, 2.0) == 0.0
    assert grad_wrt_logprob(unclipped, np.log(1.5), 0.0, 2.0) != 0.0


@pytest.mark.parametrize("agg", AGGS)
def test_cpe_policy_loss_is_one_aggregation_over_originals_and_edits(agg):
    d = random_batch(8, batch=6)
    m = d["mask"]
    edit_logprobs = d["old_logprobs"] - 0.3
    is_edit = np.array([False, False, False, True, True, True])
    loss, metrics = ppo.cpe_policy_loss(
        d["logprobs"], np.where(is_edit[:, None], np.nan, d["old_logprobs"]),
        np.where(is_edit[:, None], edit_logprobs, np.nan), d["advantages"], m, is_edit,
        clip_eps_low=0.2, clip_eps_high=0.3, edit_clip_eps_low=0.5, edit_clip_eps_high=0.5,
        agg=agg)
    tokens = np.zeros(m.shape)
    for b in range(m.shape[0]):
        for t in range(m.shape[1]):
            if is_edit[b]:
                tokens[b, t] = edit_token_reference(d["logprobs"][b, t], edit_logprobs[b, t],
                                                    d["advantages"][b, t], 0.5, 0.5)
            else:
                tokens[b, t] = ppo_token_reference(d["logprobs"][b, t], d["old_logprobs"][b, t],
                                                   d["advantages"][b, t], 0.2, 0.3, None)
    np.testing.assert_allclose(loss, aggregate_reference(tokens, m, agg), rtol=1e-5, atol=1e-6)
    want_fraction = m[is_edit].sum() / m.sum()
    np.testing.assert_allclose(metrics["edit_token_fraction"], want_fraction, rtol=1e-6)
    assert np.isfinite(metrics["orig/ppo_kl"]) and np.isfinite(metrics["edit/ratio_mean"])


# ---------------------------------------------------------------------------------------- critic


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("clip", [0.5, 0.1, None])
def test_value_loss_matches_loop(agg, clip):
    d = random_batch(9)
    m = d["mask"]
    loss, _ = ppo.value_loss(poison(d["values"], m), d["old_values"], d["returns"], m, clip=clip,
                             agg=agg)

    def token(v, old, ret):
        error = (v - ret) ** 2
        if clip is None:
            return error
        moved = old + min(max(v - old, -clip), clip)
        return max(error, (moved - ret) ** 2)

    tokens = per_token(token, d["values"], d["old_values"], d["returns"])
    np.testing.assert_allclose(loss, 0.5 * aggregate_reference(tokens, m, agg), rtol=1e-5)


def test_explained_variance():
    d = random_batch(10)
    m = d["mask"]
    valid = m > 0
    r, v = d["returns"][valid], d["values"][valid]
    np.testing.assert_allclose(ppo.explained_variance(d["values"], d["returns"], m),
                               1 - np.var(r - v) / np.var(r), rtol=1e-5)
    np.testing.assert_allclose(ppo.explained_variance(d["returns"], d["returns"], m), 1.0)


# ----------------------------------------------------------------------------------- entropy, KL


def test_entropy_from_logits_is_stable():
    logits = np.array([[1.0, 2.0, 3.0, -np.inf], [1e4, 1e4, -1e4, -np.inf], [0.0, 0.0, 0.0, 0.0]],
                      np.float32)
    got = np.asarray(ppo.entropy_from_logits(logits))
    p = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    np.testing.assert_allclose(got, [-(p * np.log(p)).sum(), np.log(2), np.log(4)], rtol=1e-5)


def test_kl_estimators():
    d = random_batch(11)
    logp, ref = d["logprobs"], d["old_logprobs"]
    np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k1"), logp - ref, rtol=1e-6)
    np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k2"), 0.5 * (logp - ref) ** 2,
                               rtol=1e-5)
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k3"), k3, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(ppo.kl_penalty(logp, ref, "k3")) >= 0)
    with pytest.raises(UserError, match="kl_kind"):
        ppo.kl_penalty(logp, ref, "k4")


def test_kl_estimators_are_unbiased_on_samples():
    """Sampling from p, mean k1 and k3 approach KL(p || q)."""
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.3, 0.5])
    samples = np.random.default_rng(0).choice(3, size=200_000, p=p)
    logp, logq = np.log(p)[samples], np.log(q)[samples]
    exact = float(np.sum(p * np.log(p / q)))
    for kind in ("k1", "k3"):
        assert float(jnp.mean(ppo.kl_penalty(logp, logq, kind))) == pytest.approx(exact, abs=5e-3)


def test_apply_kl_to_rewards():
    d = random_batch(12)
    m = d["mask"]
    rewards, mean_kl = ppo.apply_kl_to_rewards(d["rewards"], d["logprobs"], d["old_logprobs"], m,
                                               0.1, "k1")
    kl = d["logprobs"] - d["old_logprobs"]
    np.testing.assert_allclose(np.asarray(rewards)[m > 0], (d["rewards"] - 0.1 * kl)[m > 0],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean_kl, kl[m > 0].mean(), rtol=1e-5)


def test_kl_controllers():
    fixed = ppo.FixedKLController(0.05)
    assert fixed.update(100.0, 10).value == 0.05
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100.0)
    # KL 3 is half the target: error -0.5, clipped to -0.2; 10 steps of a 100 horizon.
    np.testing.assert_allclose(ctl.update(3.0, 10).value, 0.1 * (1 - 0.2 * 0.1), rtol=1e-6)
    np.testing.assert_allclose(ctl.update(6.6, 10).value, 0.1 * (1 + 0.1 * 0.1), rtol=1e-5)
    jitted = jax.jit(lambda c, kl: c.update(kl, 10))(ctl, 3.0)
    np.testing.assert_allclose(jitted.value, 0.098, rtol=1e-6)


# ---------------------------------------------------------------------------- padding and jit


@pytest.mark.parametrize("agg", AGGS)
def test_losses_ignore_extra_padding(agg):
    d = random_batch(13)
    m = d["mask"]
    is_edit = np.array([False, True, False, True, True])

    def all_losses(x):
        return [
            ppo.policy_loss(x["logprobs"], x["old_logprobs"], x["advantages"], x["mask"],
                            dual_clip_c=3.0, agg=agg)[0],
            ppo.edited_policy_loss(x["logprobs"], x["old_logprobs"], x["advantages"], x["mask"],
                                   clip_eps_low=0.2, clip_eps_high=0.2, agg=agg)[0],
            ppo.cpe_policy_loss(x["logprobs"], x["old_logprobs"], x["logprobs"] - 0.1,
                                x["advantages"], x["mask"], is_edit, agg=agg)[0],
            ppo.value_loss(x["values"], x["old_values"], x["returns"], x["mask"], agg=agg)[0],
        ]

    padded = {k: pad_columns(v, 5, 0.0 if k == "mask" else np.nan) for k, v in d.items()}
    np.testing.assert_allclose(all_losses(padded), all_losses(d), rtol=1e-6)
    assert np.all(np.isfinite(all_losses(padded)))


def test_everything_jits():
    d = random_batch(14)
    is_edit = np.array([False, True, False, True, True])

    @functools.partial(jax.jit, static_argnames=("agg",))
    def step(x, agg):
        adv, ret = ppo.gae(x["rewards"], x["values"], x["mask"], 1.0, 1.0)
        adv = ppo.masked_whiten(adv, x["mask"])
        pl, _ = ppo.cpe_policy_loss(x["logprobs"], x["old_logprobs"], x["old_logprobs"], adv,
                                    x["mask"], is_edit, dual_clip_c=3.0, agg=agg)
        vl, _ = ppo.value_loss(x["values"], x["old_values"], ret, x["mask"], agg=agg)
        kl = ppo.kl_penalty(x["logprobs"], x["old_logprobs"], "k3")
        return pl + vl + ppo.masked_mean(kl, x["mask"])

    for agg in AGGS:
        jitted = step({k: jnp.asarray(v) for k, v in d.items()}, agg)
        eager = step.__wrapped__({k: jnp.asarray(v) for k, v in d.items()}, agg)
        np.testing.assert_allclose(jitted, eager, rtol=1e-5)
