"""PPO math for Critique-Post-Edit: GAE, losses, KL estimators and controllers.

Every function is a pure, shape-static function of jax arrays, so the train step can jit it whole.
Token arrays are `[batch, time]` over the response tokens; `mask` is 1 where a token is trained on
and 0 on padding, prompt tokens and holes (e.g. tokens the policy did not generate). Masked
positions may hold any value, even NaN or -inf: they are selected away with `jnp.where`, never
multiplied by zero, so they cannot leak into a loss or a gradient.

String options (`agg`, `kind`) are Python values: pass them as static arguments when jitting.
"""

import flax.struct
import jax
import jax.numpy as jnp

from cpe_jax.errors import UserError

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_KINDS = ("k1", "k2", "k3")

# exp() of a log-ratio beyond this is meaningless and would overflow float32.
_MAX_LOG_RATIO = 20.0


# --------------------------------------------------------------------------------------------
# Masked statistics


def masked_sum(x, mask, axis=None):
    """Sum of `x` where `mask` is set (masked entries may be NaN)."""
    return jnp.sum(jnp.where(mask.astype(bool), x, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
    """Mean of `x` over the positions where `mask` is set; 0 where nothing is set.

    x, mask: same shape (mask broadcastable). Returns a scalar, or the reduced shape for `axis`.
    """
    mask = jnp.broadcast_to(mask, jnp.shape(x)).astype(bool)
    count = jnp.sum(mask, axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1)


def masked_var(x, mask):
    """Population variance of `x` over the masked positions (a scalar)."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """Normalise `x` to unit variance (and zero mean when `shift_mean`) over the masked positions.

    Used on advantages so the policy step size does not depend on the reward scale. Statistics are
    taken over the whole array (all rows and tokens); masked positions come out as 0.
    x, mask: [batch, time]. Returns [batch, time].
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask.astype(bool), whitened, 0.0)


def aggregate(loss, mask, agg="token-mean", weights=None):
    """Reduce a per-token `loss` [batch, time] to a scalar.

    - "token-mean": sum over all valid tokens / number of valid tokens (every token weighs the
      same, so long responses weigh more; the paper's choice).
    - "seq-mean-token-sum": per-row sum, averaged over rows that have at least one valid token.
    - "seq-mean-token-mean": per-row mean, averaged over rows that have at least one valid token.
    Fully masked rows (e.g. edits that were not selected) never count, so padding rows and padding
    columns do not change the value.

    `weights` [batch, time] (from `token_weights` of a larger batch) replaces the reduction by
    sum(loss * weights) over the masked tokens: the parts of a batch split into micro-batches then
    add up to the whole batch's aggregate, which is what gradient accumulation needs.
    """
    mask = jnp.asarray(mask).astype(bool)
    if weights is not None:
        return masked_sum(loss * weights, mask)
    if agg == "token-mean":
        return masked_mean(loss, mask)
    row_tokens = jnp.sum(mask, axis=-1)
    if agg == "seq-mean-token-sum":
        per_row = masked_sum(loss, mask, axis=-1)
    elif agg == "seq-mean-token-mean":
        per_row = masked_sum(loss, mask, axis=-1) / jnp.maximum(row_tokens, 1)
    else:
        raise UserError(f"loss aggregation (loss_agg) must be one of {AGG_MODES}, got {agg!r}")
    return masked_mean(per_row, row_tokens > 0)


def token_weights(mask, agg):
    """Per-token weights whose weighted sum over the batch equals `aggregate(loss, mask, agg)`.

    Computed from a whole mini-batch first, they make gradient accumulation over any micro-batch
    split (and any data-parallel split) give exactly the same update.
    """
    mask = jnp.asarray(mask).astype(jnp.float32)
    if agg == "token-mean":
        return mask / jnp.maximum(mask.sum(), 1.0)
    row_tokens = mask.sum(axis=1, keepdims=True)
    rows = jnp.maximum((row_tokens[:, 0] > 0).sum(), 1.0)
    if agg == "seq-mean-token-sum":
        return mask / rows
    if agg == "seq-mean-token-mean":
        return mask / jnp.maximum(row_tokens, 1.0) / rows
    raise UserError(f"loss aggregation (loss_agg) must be one of {AGG_MODES}, got {agg!r}")


# --------------------------------------------------------------------------------------------
# Advantages


def gae(rewards, values, mask, gamma=1.0, lam=1.0):
    """Generalised advantage estimation as a reverse `lax.scan` over time.

    Masked positions are skipped: their reward and value are ignored and the recursion carries the
    next valid step's value and advantage across them, so a hole in the middle of a response (e.g.
    tokens written by the environment) neither contributes nor cuts the return. After the last valid
    token the bootstrap value is 0 (the episode ends).

    rewards, values, mask: [batch, time]. Returns (advantages, returns), both [batch, time] float32;
    advantages are 0 at masked positions and `returns = advantages + values`.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    valid = jnp.asarray(mask).astype(bool)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, ok = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(ok, value, next_value), jnp.where(ok, advantage, next_advantage))
        return carry, jnp.where(ok, advantage, 0.0)

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    # Scan over time: put time first, and where/nan-safe inputs so masked garbage cannot leak.
    inputs = (
        jnp.where(valid, rewards, 0.0).T,
        jnp.where(valid, values, 0.0).T,
        valid.T,
    )
    _, advantages = jax.lax.scan(step, (zeros, zeros), inputs, reverse=True)
    advantages = advantages.T
    return advantages, advantages + values


def last_token_rewards(scores, mask):
    """Place one scalar reward per row on its last valid token (the usual RLHF outcome reward).

    scores: [batch]; mask: [batch, time]. Returns [batch, time] float32, zero elsewhere; rows with
    no valid token get no reward.
    """
    mask = jnp.asarray(mask).astype(bool)
    time = mask.shape[-1]
    last = jnp.max(jnp.where(mask, jnp.arange(time), -1), axis=-1)
    onehot = jnp.arange(time) == last[:, None]
    return jnp.where(onehot, jnp.asarray(scores, jnp.float32)[:, None], 0.0)


# --------------------------------------------------------------------------------------------
# Policy losses


def _ratio(logprobs, reference_logprobs, mask):
    """exp(logprobs - reference_logprobs); ratio 1 at masked positions, exponent bounded."""
    log_ratio = jnp.where(mask, logprobs - reference_logprobs, 0.0)
    log_ratio = jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return jnp.exp(log_ratio), log_ratio


def _clipped_surrogate(ratio, advantages, eps_low, eps_high):
    """Per-token pessimistic PPO surrogate max(-A r, -A clip(r)) and where clipping was binding."""
    unclipped = -advantages * ratio
    if eps_low is None and eps_high is None:
        return unclipped, jnp.zeros(ratio.shape, bool)
    low = -jnp.inf if eps_low is None else 1.0 - eps_low
    high = jnp.inf if eps_high is None else 1.0 + eps_high
    clipped = -advantages * jnp.clip(ratio, low, high)
    return jnp.maximum(unclipped, clipped), clipped > unclipped


def ppo_token_losses(logprobs, old_logprobs, advantages, mask, *, clip_eps_low=0.2,
                     clip_eps_high=0.2, dual_clip_c=None):
    """Per-token PPO-clip loss and its diagnostics (see `policy_loss`); all [batch, time]."""
    mask = jnp.asarray(mask).astype(bool)
    advantages = jnp.where(mask, advantages, 0.0)
    ratio, log_ratio = _ratio(logprobs, old_logprobs, mask)
    loss, clipped = _clipped_surrogate(ratio, advantages, clip_eps_low, clip_eps_high)
    dual_clipped = jnp.zeros(loss.shape, bool)
    if dual_clip_c is not None:
        # For A < 0 a huge ratio makes -A*r unbounded; cap the loss at -A*c (Ye et al., 2020).
        cap = -advantages * dual_clip_c
        dual_clipped = (advantages < 0) & (loss > cap)
        loss = jnp.where(dual_clipped, cap, loss)
    return loss, dict(ratio=ratio, log_ratio=log_ratio, clipped=clipped, dual_clipped=dual_clipped)


def _policy_metrics(parts, mask):
    log_ratio = parts["log_ratio"]
    return {
        "clip_fraction": masked_mean(parts["clipped"].astype(jnp.float32), mask),
        "dual_clip_fraction": masked_mean(parts["dual_clipped"].astype(jnp.float32), mask),
        # k3 estimate of KL(old || new) from tokens sampled under old: non-negative, low variance.
        "ppo_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
        "ratio_mean": masked_mean(parts["ratio"], mask),
    }


def policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps_low=0.2, clip_eps_high=0.2,
                dual_clip_c=None, agg="token-mean"):
    """PPO-clip loss with asymmetric epsilons and optional dual-clip.

    ratio = exp(logprobs - old_logprobs); per token loss = max(-A*ratio, -A*clip(ratio, 1-eps_low,
    1+eps_high)); with `dual_clip_c` (> 1) the loss of negative-advantage tokens is further capped
    at -A*c. An epsilon of None leaves that side unclipped.

    logprobs, old_logprobs, advantages, mask: [batch, time]. Returns (scalar loss, metrics dict of
    scalars: clip_fraction, dual_clip_fraction, ppo_kl, ratio_mean).
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise UserError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    loss, parts = ppo_token_losses(logprobs, old_logprobs, advantages, mask,
                                   clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
                                   dual_clip_c=dual_clip_c)
    return aggregate(loss, mask, agg), _policy_metrics(parts, jnp.asarray(mask).astype(bool))


def edited_token_losses(logprobs, edit_logprobs, advantages, mask, *, clip_eps_low=None,
                        clip_eps_high=None):
    """Per-token loss on edited tokens, -A * pi_theta / pi_e (see `edited_policy_loss`)."""
    mask = jnp.asarray(mask).astype(bool)
    advantages = jnp.where(mask, advantages, 0.0)
    ratio, log_ratio = _ratio(logprobs, edit_logprobs, mask)
    loss, clipped = _clipped_surrogate(ratio, advantages, clip_eps_low, clip_eps_high)
    zeros = jnp.zeros(loss.shape, bool)
    return loss, dict(ratio=ratio, log_ratio=log_ratio, clipped=clipped, dual_clipped=zeros)


def edited_policy_loss(logprobs, edit_logprobs, advantages, mask, *, clip_eps_low=None,
                       clip_eps_high=None, agg="token-mean"):
    """The paper's loss on edited responses: -A * pi_theta / pi_e.

    pi_e is the probability of the edited tokens in the context they were generated in (prompt +
    original response + critique), while pi_theta scores them after the ORIGINAL prompt; the ratio
    is an importance weight between these two contexts. Optional clipping follows PPO's pessimistic
    rule, max(-A*r, -A*clip(r, 1-eps_low, 1+eps_high)): once the ratio has moved past the clip range
    in the direction the advantage pushes it, that token stops giving gradient, but a ratio on the
    wrong side (e.g. pi_theta << pi_e with A > 0, the usual case at first, since the critique makes
    the edit likelier) keeps its full gradient. A hard clip of the ratio would instead silence
    exactly the edits the policy most needs to learn from.

    logprobs, edit_logprobs, advantages, mask: [batch, time]. Returns (scalar loss, metrics).
    """
    loss, parts = edited_token_losses(logprobs, edit_logprobs, advantages, mask,
                                      clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high)
    return aggregate(loss, mask, agg), _policy_metrics(parts, jnp.asarray(mask).astype(bool))


def cpe_policy_loss(logprobs, old_logprobs, edit_logprobs, advantages, mask, is_edit, *,
                    clip_eps_low=0.2, clip_eps_high=0.2, dual_clip_c=None, edit_clip_eps_low=None,
                    edit_clip_eps_high=None, agg="token-mean", weights=None):
    """One loss over originals and edits: PPO-clip on originals, -A*pi_theta/pi_e on edits.

    Both per-token losses are computed for every row and the row's `is_edit` flag picks one, then
    a single aggregation runs over the whole batch (DESIGN: token-mean over the batch), so an edit
    token weighs exactly as much as an original token.

    logprobs, old_logprobs, edit_logprobs, advantages, mask: [batch, time] (edit_logprobs is only
    read on edit rows, old_logprobs only on original rows); is_edit: bool [batch]; weights: see
    `aggregate`. Returns (scalar loss, metrics): the policy metrics of originals and of edits apart
    (prefixes "orig/" and "edit/") and the token share of edits.
    """
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise UserError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    mask = jnp.asarray(mask).astype(bool)
    edit_rows = jnp.asarray(is_edit).astype(bool)[:, None]
    orig_loss, orig_parts = ppo_token_losses(
        logprobs, old_logprobs, advantages, mask & ~edit_rows, clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high, dual_clip_c=dual_clip_c)
    edit_loss, edit_parts = edited_token_losses(
        logprobs, edit_logprobs, advantages, mask & edit_rows, clip_eps_low=edit_clip_eps_low,
        clip_eps_high=edit_clip_eps_high)
    loss = aggregate(jnp.where(edit_rows, edit_loss, orig_loss), mask, agg, weights)
    metrics = {f"orig/{k}": v for k, v in _policy_metrics(orig_parts, mask & ~edit_rows).items()}
    edit_metrics = _policy_metrics(edit_parts, mask & edit_rows)
    metrics.update({f"edit/{k}": v for k, v in edit_metrics.items()})
    metrics["edit_token_fraction"] = masked_mean(jnp.broadcast_to(edit_rows, mask.shape)
                                                 .astype(jnp.float32), mask)
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Critic


def value_loss(values, old_values, returns, mask, clip=0.5, agg="token-mean", weights=None):
    """Clipped value loss: 0.5 * max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2).

    The clip keeps the critic from moving its prediction more than `clip` per update; `clip=None`
    gives the plain squared error. values, old_values, returns, mask: [batch, time]; weights: see
    `aggregate`. Returns (scalar loss, metrics: value_clip_fraction).
    """
    mask = jnp.asarray(mask).astype(bool)
    unclipped = jnp.square(values - returns)
    if clip is None:
        per_token, clipped = unclipped, jnp.zeros(mask.shape, bool)
    else:
        moved = old_values + jnp.clip(values - old_values, -clip, clip)
        clipped_error = jnp.square(moved - returns)
        per_token, clipped = jnp.maximum(unclipped, clipped_error), clipped_error > unclipped
    loss = 0.5 * aggregate(per_token, mask, agg, weights)
    return loss, {"value_clip_fraction": masked_mean(clipped.astype(jnp.float32), mask)}


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over valid tokens: 1 is a perfect critic, 0 is a
    constant one, negative is worse than a constant. NaN when the returns have no variance."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns


# --------------------------------------------------------------------------------------------
# Entropy and KL


def entropy_from_logits(logits):
    """Entropy of softmax(logits) over the last axis; stable for large and -inf logits.

    logits: [..., vocab]. Returns [...] float32.
    """
    logits = jnp.asarray(logits, jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    return -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)


def kl_penalty(logprobs, ref_logprobs, kind="k3"):
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled under pi_theta (Schulman).

    k1 = logp - ref (unbiased, can be negative), k2 = 0.5 (logp - ref)^2, k3 = exp(ref - logp) -
    (ref - logp) - 1 (unbiased, non-negative, low variance). Usable as a reward term
    (`apply_kl_to_rewards`) or, masked and aggregated, as a loss. Inputs [batch, time]; returns the
    same shape.
    """
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * jnp.square(diff)
    if kind == "k3":
        neg = jnp.clip(-diff, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return jnp.expm1(neg) - neg
    raise UserError(f"KL estimator (kl_kind) must be one of {KL_KINDS}, got {kind!r}")


def apply_kl_to_rewards(token_rewards, logprobs, ref_logprobs, mask, kl_coef, kind="k1"):
    """Subtract kl_coef * KL from the per-token rewards on valid tokens.

    Returns (rewards [batch, time], mean KL over valid tokens), the latter for the KL controller.
    """
    mask = jnp.asarray(mask).astype(bool)
    kl = jnp.where(mask, kl_penalty(logprobs, ref_logprobs, kind), 0.0)
    return jnp.where(mask, token_rewards - kl_coef * kl, 0.0), masked_mean(kl, mask)


@flax.struct.dataclass
class FixedKLController:
    """A constant KL coefficient, with the same interface as the adaptive one."""

    value: float

    def update(self, current_kl, n_steps):
        del current_kl, n_steps
        return self


@flax.struct.dataclass
class AdaptiveKLController:
    """KL coefficient steered towards a target KL (Ziegler et al., 2019).

    The coefficient is multiplied by 1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon, so it
    rises when the policy drifts too far from the reference and falls when it stays close. A pytree:
    `value` is the state to checkpoint; `target` and `horizon` are static.
    """

    value: float
    target: float = flax.struct.field(pytree_node=False, default=6.0)
    horizon: float = flax.struct.field(pytree_node=False, default=10000.0)

    def update(self, current_kl, n_steps):
        error = jnp.clip(current_kl / self.target - 1.0, -0.2, 0.2)
        return self.replace(value=self.value * (1.0 + error * n_steps / self.horizon))
