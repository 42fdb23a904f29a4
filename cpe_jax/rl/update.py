"""The ONE PPO/CPE update: (train state, rollout batch, key) -> (new state, metrics), pure and jitted.

Built from `rl/ppo.py`'s functions, so the tests of `ppo.py` test what trains:
log-probs of the sampling policy, critic values, pi_e and the reference -> rewards on the last
token (minus the KL penalty, `ppo.apply_kl_to_rewards`) -> `ppo.gae` -> whitened advantages -> for
each epoch and mini-batch, gradients of `ppo.cpe_policy_loss` + `ppo.value_loss` accumulated over
micro-batches with token weights of the whole mini-batch (`ppo.token_weights`), so any micro-batch
or data-parallel split gives the same update -> the KL controller's new coefficient.

Both rollout backends (the host rollout and the fused single-jit step) end in this function.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cpe_jax.models.logprobs import token_logprobs
from cpe_jax.rl import ppo
from cpe_jax.rl.edits import build_training_rows
from cpe_jax.train.batching import map_micro, split_micro
from cpe_jax.train.loop import NONFINITE_METRIC
from cpe_jax.train.numerics import count_nonfinite

# Metrics of the mini-batch updates that are sums over micro-batches (the losses, by the token
# weights); every other one is the mean over micro-batches and mini-batches.
SUMMED = ("actor/pg_loss", "critic/value_loss", "actor/entropy")


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the update (hashable: part of the jit cache key)."""

    prompt_length: int
    response_length: int
    edit_prompt_length: int
    num_mini_batches: int
    micro_batch_size: int
    epochs: int
    clip_eps_low: float
    clip_eps_high: float
    dual_clip_c: float
    edit_clip_eps_low: float
    edit_clip_eps_high: float
    value_clip: float
    gamma: float
    lam: float
    whiten_advantages: bool
    loss_agg: str
    entropy_coef: float
    kl_in_reward: bool
    kl_loss: bool
    kl_kind: str
    pi_e_source: str  # "recompute" or "sampler"
    kl_target: float = 0.0  # 0: a fixed KL coefficient; else adapted towards this KL (Ziegler et al.)
    kl_horizon: float = 10000.0

    def kl_controller(self, value):
        """The KL controller holding coefficient `value` (fixed, or adaptive towards kl_target)."""
        if self.kl_target:
            return ppo.AdaptiveKLController(value=value, target=self.kl_target, horizon=self.kl_horizon)
        return ppo.FixedKLController(value=value)


def settings_from_config(config, kl_on):
    """The update's settings from a PPO config (`rl.trainer.default_config`)."""
    p, e = config.ppo, config.edit
    return StepSettings(
        prompt_length=config.rollout.max_prompt_length,
        response_length=config.rollout.max_response_length,
        edit_prompt_length=e.max_prompt_length,
        num_mini_batches=p.prompts_per_step // p.mini_batch_size,
        micro_batch_size=p.micro_batch_size or 0,
        epochs=p.epochs,
        clip_eps_low=p.clip_eps_low, clip_eps_high=p.clip_eps_high,
        dual_clip_c=p.get("dual_clip_c") or None,
        edit_clip_eps_low=e.get("clip_eps_low"), edit_clip_eps_high=e.get("clip_eps_high"),
        value_clip=p.value_clip, gamma=p.gamma, lam=p.lam, whiten_advantages=p.whiten_advantages,
        loss_agg=p.loss_agg, entropy_coef=p.entropy_coef, kl_in_reward=kl_on and p.kl_in_reward,
        kl_loss=kl_on and p.kl_loss, kl_kind=p.kl_kind, pi_e_source=e.pi_e,
        kl_target=float(p.get("kl_target", 0.0)), kl_horizon=float(p.get("kl_horizon", 10000.0)),
    )


# ---- per-token quantities from the models ----------------------------------------------------


def response_logprobs(graphdef, state, tokens, attention_mask, prompt_length, response_length,
                      return_entropy=False):
    """Log-probs [B, R] of the response tokens tokens[:, P:P+R] given everything before them."""
    from cpe_jax.models.qwen2.model import positions_from_mask

    model = nnx.merge(graphdef, state)
    logits, _ = model(tokens, positions_from_mask(attention_mask), None, attention_mask)
    logits = logits[:, prompt_length - 1: prompt_length + response_length - 1]
    logprobs = token_logprobs(logits, tokens[:, prompt_length: prompt_length + response_length])
    if return_entropy:
        return logprobs, ppo.entropy_from_logits(logits)
    return logprobs


def response_values(graphdef, state, tokens, attention_mask, prompt_length, response_length):
    """Critic values [B, R] of the states before each response token (verl's alignment)."""
    from cpe_jax.models.qwen2.model import positions_from_mask

    critic = nnx.merge(graphdef, state)
    values = critic(tokens, positions_from_mask(attention_mask), attention_mask)
    return values[:, prompt_length - 1: prompt_length + response_length - 1]


def num_micro(rows, micro_batch_size):
    """How many gradient-accumulation chunks `rows` rows make (1 when micro_batch_size is 0)."""
    return max(rows // micro_batch_size, 1) if micro_batch_size else 1


def mini_batch_order(key, rows, num_mini_batches):
    """A random order of the rows such that `split_micro(rows[order], n)[i]` is mini-batch i:
    the rows perm[i*m:(i+1)*m] of one random permutation (m rows per mini-batch)."""
    perm = jax.random.permutation(key, rows)
    return perm.reshape(num_mini_batches, -1).T.reshape(-1)


# ---- the losses --------------------------------------------------------------------------------


def update_losses(policy_graphdef, critic_graphdef, s: StepSettings, policy, critic, mb, weights, kl_coef):
    """(policy loss + value loss, metrics) of one micro-batch: `ppo.cpe_policy_loss` (PPO-clip on
    originals, -A pi_theta/pi_e on edits) minus the entropy bonus plus the KL loss, and
    `ppo.value_loss`, each reduced by the mini-batch's token `weights`."""
    P, R = s.prompt_length, s.response_length
    logprobs, entropy = response_logprobs(policy_graphdef, policy, mb["tokens"], mb["attn"], P, R,
                                          return_entropy=True)
    policy_loss, policy_metrics = ppo.cpe_policy_loss(
        logprobs, mb["old_logprobs"], mb["edit_logprobs"], mb["advantages"], mb["mask"], mb["is_edit"],
        clip_eps_low=s.clip_eps_low, clip_eps_high=s.clip_eps_high, dual_clip_c=s.dual_clip_c,
        edit_clip_eps_low=s.edit_clip_eps_low, edit_clip_eps_high=s.edit_clip_eps_high, agg=s.loss_agg,
        weights=weights)
    entropy_mean = ppo.aggregate(entropy, mb["mask"], s.loss_agg, weights)
    loss = policy_loss
    if s.entropy_coef:
        loss = loss - s.entropy_coef * entropy_mean
    if s.kl_loss:
        loss = loss + kl_coef * ppo.aggregate(ppo.kl_penalty(logprobs, mb["ref_logprobs"], s.kl_kind),
                                              mb["mask"], s.loss_agg, weights)
    values = response_values(critic_graphdef, critic, mb["tokens"], mb["attn"], P, R)
    value_loss, value_metrics = ppo.value_loss(values, mb["old_values"], mb["returns"], mb["mask"],
                                               clip=s.value_clip, agg=s.loss_agg, weights=weights)
    metrics = {
        "actor/pg_loss": policy_loss,
        "critic/value_loss": value_loss,
        "actor/entropy": entropy_mean,
        "actor/clip_frac": policy_metrics["orig/clip_fraction"],
        "actor/ppo_kl": policy_metrics["orig/ppo_kl"],
        "actor/edit_ratio": policy_metrics["edit/ratio_mean"],
        "critic/value_clip_frac": value_metrics["value_clip_fraction"],
    }
    return loss + value_loss, metrics


# ---- the update --------------------------------------------------------------------------------


def train_step(policy_graphdef, critic_graphdef, policy_tx, critic_tx, settings: StepSettings,
               state, batch: dict, rng):
    """(ActorCriticState, rollout batch, key) -> (new state, metrics). Pure; jitted by the trainer."""
    s = settings
    rows = build_training_rows(
        batch["prompt_tokens"], batch["prompt_mask"], batch["orig_tokens"], batch["orig_mask"],
        batch["edit_tokens"], batch["edit_mask"], batch["keep_edit"], orig_keep=batch["orig_valid"],
    )
    tokens, attn, resp_mask = rows.tokens, rows.attention_mask, rows.response_mask.astype(jnp.float32)
    n_rows = tokens.shape[0]
    micro = num_micro(n_rows, s.micro_batch_size)
    P, R = s.prompt_length, s.response_length

    # Log-probs under the policy that sampled (old), values, pi_e and the reference.
    def old_quantities(mb):
        lp = response_logprobs(policy_graphdef, state.policy, mb["tokens"], mb["attn"], P, R)
        v = response_values(critic_graphdef, state.critic, mb["tokens"], mb["attn"], P, R)
        return lp, v

    old_logprobs, old_values = map_micro(old_quantities, {"tokens": tokens, "attn": attn}, micro)
    old_logprobs = jax.lax.stop_gradient(old_logprobs)

    n_orig = batch["orig_tokens"].shape[0]
    if s.pi_e_source == "recompute":
        edit_rows = jnp.concatenate([batch["edit_prompt_tokens"], batch["edit_tokens"]], axis=1)
        edit_attn = jnp.concatenate([batch["edit_prompt_mask"], batch["edit_mask"]], axis=1)
        pi_e = map_micro(
            lambda mb: response_logprobs(policy_graphdef, state.policy, mb[0], mb[1], s.edit_prompt_length, R),
            (edit_rows, edit_attn), num_micro(n_orig, s.micro_batch_size),
        )
    else:
        pi_e = batch["edit_sampler_logprobs"].astype(jnp.float32)
    edit_logprobs = jnp.concatenate([old_logprobs[:n_orig], pi_e], axis=0)

    rewards_row = jnp.concatenate([batch["orig_rewards"], batch["edit_rewards"]])
    token_rewards = ppo.last_token_rewards(rewards_row, resp_mask)
    metrics = {}
    use_ref = s.kl_in_reward or s.kl_loss
    kl_coef = state.kl_coef
    if use_ref:
        ref_logprobs = map_micro(
            lambda mb: response_logprobs(policy_graphdef, state.ref, mb["tokens"], mb["attn"], P, R),
            {"tokens": tokens, "attn": attn}, micro,
        )
        rewarded, kl_mean = ppo.apply_kl_to_rewards(token_rewards, old_logprobs, ref_logprobs, resp_mask,
                                                    state.kl_coef, s.kl_kind)
        if s.kl_in_reward:
            token_rewards = rewarded
        metrics["kl/ref"] = kl_mean
        kl_coef = s.kl_controller(state.kl_coef).update(kl_mean, n_orig).value
    else:
        ref_logprobs = old_logprobs
    metrics["actor/kl_coef"] = state.kl_coef

    advantages, returns = ppo.gae(token_rewards, old_values, resp_mask, s.gamma, s.lam)
    if s.whiten_advantages:
        advantages = ppo.masked_whiten(advantages, resp_mask)
    metrics["critic/explained_variance"] = ppo.explained_variance(old_values, returns, resp_mask)
    metrics["critic/values"] = ppo.masked_mean(old_values, resp_mask)
    metrics["critic/returns"] = ppo.masked_mean(returns, resp_mask)

    data = dict(tokens=tokens, attn=attn, mask=resp_mask, is_edit=rows.is_edit,
                old_logprobs=old_logprobs, edit_logprobs=edit_logprobs, ref_logprobs=ref_logprobs,
                advantages=advantages, returns=returns, old_values=old_values)

    def losses(policy, critic, mb, weights):
        return update_losses(policy_graphdef, critic_graphdef, s, policy, critic, mb, weights, state.kl_coef)

    grad_fn = jax.grad(losses, argnums=(0, 1), has_aux=True)

    def mini_batch_update(carry, mb):
        policy, critic, policy_opt, critic_opt = carry
        mb = dict(mb, weights=ppo.token_weights(mb["mask"], s.loss_agg))
        n_micro = num_micro(mb["tokens"].shape[0], s.micro_batch_size)

        def accumulate(acc, micro_mb):
            (g_policy, g_critic), stats = grad_fn(policy, critic, micro_mb, micro_mb["weights"])
            return jax.tree.map(jnp.add, acc, ((g_policy, g_critic), stats)), None

        zeros = jax.tree.map(jnp.zeros_like, (policy, critic))
        one_row = jax.tree.map(lambda x: x[:1], mb)
        zero_stats = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                  jax.eval_shape(lambda: grad_fn(policy, critic, one_row, one_row["weights"])[1]))
        (grads, stats), _ = jax.lax.scan(accumulate, (zeros, zero_stats), split_micro(mb, n_micro))
        stats = {k: v if k in SUMMED else v / n_micro for k, v in stats.items()}
        g_policy, g_critic = grads
        stats["actor/grad_norm"] = optax.tree.norm(g_policy)
        stats["critic/grad_norm"] = optax.tree.norm(g_critic)
        updates, policy_opt = policy_tx.update(g_policy, policy_opt, policy)
        policy = optax.apply_updates(policy, updates)
        updates, critic_opt = critic_tx.update(g_critic, critic_opt, critic)
        critic = optax.apply_updates(critic, updates)
        return (policy, critic, policy_opt, critic_opt), stats

    carry = (state.policy, state.critic, state.policy_opt, state.critic_opt)
    all_stats = []
    for epoch in range(s.epochs):
        order = mini_batch_order(jax.random.fold_in(rng, epoch), n_rows, s.num_mini_batches)
        shuffled = jax.tree.map(lambda x: x[order], data)
        carry, stats = jax.lax.scan(mini_batch_update, carry, split_micro(shuffled, s.num_mini_batches))
        all_stats.append(stats)
    policy, critic, policy_opt, critic_opt = carry
    stats = jax.tree.map(lambda *x: jnp.mean(jnp.concatenate([jnp.atleast_1d(v) for v in x])), *all_stats)
    metrics.update(stats)
    edit_mask = batch["edit_mask"]
    checked = [(old_logprobs, resp_mask), (old_values, resp_mask), (pi_e, edit_mask)]
    for name, mask in (("orig_sampler_logprobs", batch["orig_mask"]), ("edit_sampler_logprobs", edit_mask)):
        if name in batch:  # the sampler's own log-probs, when the rollout passes them on
            checked.append((batch[name], mask))
    if use_ref:
        checked.append((ref_logprobs, resp_mask))
    checked += [(v, jnp.ones(v.shape, bool)) for v in stats.values()]  # losses and gradient norms
    metrics[NONFINITE_METRIC] = count_nonfinite(*checked)
    metrics["actor/advantages"] = ppo.masked_mean(advantages, resp_mask)
    metrics["train/tokens"] = resp_mask.sum()
    metrics["train/rows"] = (resp_mask.sum(axis=1) > 0).sum()
    new_state = state.replace(policy=policy, critic=critic, policy_opt=policy_opt,
                              critic_opt=critic_opt, kl_coef=kl_coef, step=state.step + 1)
    return new_state, metrics
