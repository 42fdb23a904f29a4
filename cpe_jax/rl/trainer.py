"""PPO with Critique-Post-Edit: train state, the jitted train step, and the resumable loop.

One step:  rollout (jit) -> GRM score + critique (host judge) -> edit rollout (jit) -> GRM score
(host) -> select edits -> `train_step` (ONE jit: log-probs, values, pi_e, rewards, GAE, PPO
mini-batch epochs with gradient accumulation, donated state, explicit shardings).

Randomness is `fold_in(key(seed), step)` and the data position is saved with every checkpoint, so
a resumed run reproduces an uninterrupted one exactly.
"""

import dataclasses
import logging
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from cpe_jax.errors import JudgeUnavailable, UserError
from cpe_jax.rl import ppo
from cpe_jax.rl.edits import build_training_rows

log = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per chip, for the MFU estimate (None: unknown device, no MFU).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}


@struct.dataclass
class TrainState:
    policy: nnx.State
    critic: nnx.State
    ref: nnx.State  # an empty dict when KL is off (no reference model is kept)
    policy_opt: optax.OptState
    critic_opt: optax.OptState
    kl_coef: jax.Array
    step: jax.Array


# ---- per-token quantities from the models ----------------------------------------------------


def response_logprobs(graphdef, state, tokens, attention_mask, prompt_length, response_length,
                      return_entropy=False):
    """Log-probs [B, R] of the response tokens tokens[:, P:P+R] given everything before them."""
    from cpe_jax.models.qwen2.model import positions_from_mask

    model = nnx.merge(graphdef, state)
    logits, _ = model(tokens, positions_from_mask(attention_mask), None, attention_mask)
    logits = logits[:, prompt_length - 1: prompt_length + response_length - 1]
    targets = tokens[:, prompt_length: prompt_length + response_length]
    logz = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprobs = chosen - logz
    if return_entropy:
        return logprobs, ppo.entropy_from_logits(logits)
    return logprobs


def response_values(graphdef, state, tokens, attention_mask, prompt_length, response_length):
    """Critic values [B, R] of the states before each response token (verl's alignment)."""
    from cpe_jax.models.qwen2.model import positions_from_mask

    critic = nnx.merge(graphdef, state)
    values = critic(tokens, positions_from_mask(attention_mask), attention_mask)
    return values[:, prompt_length - 1: prompt_length + response_length - 1]


def _micro_batches(tree, n):
    """Split the leading axis into n equal micro-batches: [B, ...] -> [n, B/n, ...]."""
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), tree)


def _map_micro(fn, tree, n):
    """Apply fn over n micro-batches sequentially (bounded memory) and re-concatenate."""
    out = jax.lax.map(fn, _micro_batches(tree, n))
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)


# ---- the train step --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the train step (hashable: part of the jit cache key)."""

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


def token_weights(mask, agg):
    """Per-token weights whose weighted sum equals `ppo.aggregate(loss, mask, agg)` over the batch.

    Computing weights from the whole mini-batch first makes gradient accumulation over any
    micro-batch split (and any data-parallel split) give exactly the same update.
    """
    mask = mask.astype(jnp.float32)
    if agg == "token-mean":
        return mask / jnp.maximum(mask.sum(), 1.0)
    row_tokens = mask.sum(axis=1, keepdims=True)
    rows = jnp.maximum((row_tokens[:, 0] > 0).sum(), 1.0)
    if agg == "seq-mean-token-sum":
        return mask / rows
    if agg == "seq-mean-token-mean":
        return mask / jnp.maximum(row_tokens, 1.0) / rows
    raise UserError(f"config field ppo.loss_agg: {agg!r} is not one of {ppo.AGG_MODES}")


def count_nonfinite(*pairs):
    """How many entries of the (values, mask) pairs are NaN or infinite where the mask is set:
    one such log-prob or value poisons every update it reaches, so the run must stop on it."""
    total = jnp.zeros((), jnp.int32)
    for values, mask in pairs:
        total = total + jnp.sum((~jnp.isfinite(values)) & (mask > 0)).astype(jnp.int32)
    return total


def train_step(policy_graphdef, critic_graphdef, policy_tx, critic_tx, settings: StepSettings,
               state: TrainState, batch: dict, rng):
    """(state, rollout batch, key) -> (new state, metrics). Pure; jitted by `Trainer`."""
    s = settings
    rows = build_training_rows(
        batch["prompt_tokens"], batch["prompt_mask"], batch["orig_tokens"], batch["orig_mask"],
        batch["edit_tokens"], batch["edit_mask"], batch["keep_edit"], orig_keep=batch["orig_valid"],
    )
    tokens, attn, resp_mask = rows.tokens, rows.attention_mask, rows.response_mask.astype(jnp.float32)
    n_rows = tokens.shape[0]
    micro = max(n_rows // s.micro_batch_size, 1) if s.micro_batch_size else 1
    P, R = s.prompt_length, s.response_length

    # Log-probs under the policy that sampled (old), values, pi_e and the reference.
    def old_quantities(mb):
        lp = response_logprobs(policy_graphdef, state.policy, mb["tokens"], mb["attn"], P, R)
        v = response_values(critic_graphdef, state.critic, mb["tokens"], mb["attn"], P, R)
        return lp, v

    old_logprobs, old_values = _map_micro(old_quantities, {"tokens": tokens, "attn": attn}, micro)
    old_logprobs = jax.lax.stop_gradient(old_logprobs)

    n_orig = batch["orig_tokens"].shape[0]
    if s.pi_e_source == "recompute":
        edit_rows = jnp.concatenate([batch["edit_prompt_tokens"], batch["edit_tokens"]], axis=1)
        edit_attn = jnp.concatenate([batch["edit_prompt_mask"], batch["edit_mask"]], axis=1)
        edit_micro = max(n_orig // s.micro_batch_size, 1) if s.micro_batch_size else 1
        pi_e = _map_micro(
            lambda mb: response_logprobs(policy_graphdef, state.policy, mb[0], mb[1], s.edit_prompt_length, R),
            (edit_rows, edit_attn), edit_micro,
        )
    else:
        pi_e = batch["edit_sampler_logprobs"].astype(jnp.float32)
    edit_logprobs = jnp.concatenate([old_logprobs[:n_orig], pi_e], axis=0)

    rewards_row = jnp.concatenate([batch["orig_rewards"], batch["edit_rewards"]])
    token_rewards = ppo.last_token_rewards(rewards_row, resp_mask)
    metrics = {}
    use_ref = s.kl_in_reward or s.kl_loss
    if use_ref:
        ref_logprobs = _map_micro(
            lambda mb: response_logprobs(policy_graphdef, state.ref, mb["tokens"], mb["attn"], P, R),
            {"tokens": tokens, "attn": attn}, micro,
        )
        kl = ppo.kl_penalty(old_logprobs, ref_logprobs, s.kl_kind)
        metrics["kl/ref"] = ppo.masked_mean(kl, resp_mask)
        if s.kl_in_reward:
            token_rewards = token_rewards - state.kl_coef * jnp.where(resp_mask > 0, kl, 0.0)
    else:
        ref_logprobs = old_logprobs

    advantages, returns = ppo.gae(token_rewards, old_values, resp_mask, s.gamma, s.lam)
    if s.whiten_advantages:
        advantages = ppo.masked_whiten(advantages, resp_mask)
    metrics["critic/explained_variance"] = ppo.explained_variance(old_values, returns, resp_mask)
    metrics["critic/values"] = ppo.masked_mean(old_values, resp_mask)
    metrics["critic/returns"] = ppo.masked_mean(returns, resp_mask)

    data = dict(tokens=tokens, attn=attn, mask=resp_mask, is_edit=rows.is_edit,
                old_logprobs=old_logprobs, edit_logprobs=edit_logprobs, ref_logprobs=ref_logprobs,
                advantages=advantages, returns=returns, old_values=old_values)

    def losses(policy, critic, mb, weights, kl_coef):
        logprobs, entropy = response_logprobs(policy_graphdef, policy, mb["tokens"], mb["attn"], P, R,
                                              return_entropy=True)
        orig_loss, orig_parts = ppo.ppo_token_losses(
            logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"], clip_eps_low=s.clip_eps_low,
            clip_eps_high=s.clip_eps_high, dual_clip_c=s.dual_clip_c,
        )
        edit_loss = ppo.edited_token_losses(
            logprobs, mb["edit_logprobs"], mb["advantages"], mb["mask"],
            clip_eps_low=s.edit_clip_eps_low, clip_eps_high=s.edit_clip_eps_high,
        )
        edit_loss = edit_loss[0] if isinstance(edit_loss, tuple) else edit_loss
        token_loss = jnp.where(mb["is_edit"][:, None], edit_loss, orig_loss)
        if s.entropy_coef:
            token_loss = token_loss - s.entropy_coef * entropy
        if s.kl_loss:
            token_loss = token_loss + kl_coef * ppo.kl_penalty(logprobs, mb["ref_logprobs"], s.kl_kind)
        policy_loss = jnp.sum(jnp.where(weights > 0, token_loss, 0.0) * weights)

        values = response_values(critic_graphdef, critic, mb["tokens"], mb["attn"], P, R)
        clipped = mb["old_values"] + jnp.clip(values - mb["old_values"], -s.value_clip, s.value_clip)
        v_err = jnp.maximum((values - mb["returns"]) ** 2, (clipped - mb["returns"]) ** 2)
        value_loss = 0.5 * jnp.sum(v_err * weights)

        w = weights
        stats = {
            "actor/pg_loss": policy_loss,
            "critic/value_loss": value_loss,
            "actor/entropy": jnp.sum(entropy * w),
            "actor/clip_frac": jnp.sum(jnp.where(mb["is_edit"][:, None], 0.0, orig_parts["clipped"]) * w),
            "actor/ppo_kl": jnp.sum(jnp.where(mb["is_edit"][:, None], 0.0, mb["old_logprobs"] - logprobs) * w),
            "critic/value_clip_frac": jnp.sum((jnp.abs(values - mb["old_values"]) > s.value_clip) * w),
        }
        return policy_loss + value_loss, stats

    grad_fn = jax.grad(losses, argnums=(0, 1), has_aux=True)

    def mini_batch_update(carry, mb):
        policy, critic, policy_opt, critic_opt = carry
        weights = token_weights(mb["mask"], s.loss_agg)

        def accumulate(acc, micro_mb):
            (g_policy, g_critic), stats = grad_fn(policy, critic, micro_mb, micro_mb["weights"], state.kl_coef)
            return jax.tree.map(jnp.add, acc, ((g_policy, g_critic), stats)), None

        mb = dict(mb, weights=weights)
        rows_per_mb = mb["tokens"].shape[0]
        n_micro = max(rows_per_mb // s.micro_batch_size, 1) if s.micro_batch_size else 1
        zeros = jax.tree.map(jnp.zeros_like, (policy, critic))
        zero_stats = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                  jax.eval_shape(lambda: grad_fn(policy, critic, jax.tree.map(lambda x: x[:1], mb), mb["weights"][:1], state.kl_coef)[1]))
        (grads, stats), _ = jax.lax.scan(accumulate, (zeros, zero_stats), _micro_batches(mb, n_micro))
        g_policy, g_critic = grads
        stats["actor/grad_norm"] = optax.global_norm(g_policy)
        stats["critic/grad_norm"] = optax.global_norm(g_critic)
        updates, policy_opt = policy_tx.update(g_policy, policy_opt, policy)
        policy = optax.apply_updates(policy, updates)
        updates, critic_opt = critic_tx.update(g_critic, critic_opt, critic)
        critic = optax.apply_updates(critic, updates)
        return (policy, critic, policy_opt, critic_opt), stats

    carry = (state.policy, state.critic, state.policy_opt, state.critic_opt)
    all_stats = []
    for epoch in range(s.epochs):
        perm = jax.random.permutation(jax.random.fold_in(rng, epoch), n_rows)
        shuffled = jax.tree.map(lambda x: x[perm], data)
        carry, stats = jax.lax.scan(mini_batch_update, carry, _micro_batches(shuffled, s.num_mini_batches))
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
    metrics["numerics/nonfinite"] = count_nonfinite(*checked)
    metrics["actor/advantages"] = ppo.masked_mean(advantages, resp_mask)
    metrics["train/tokens"] = resp_mask.sum()
    metrics["train/rows"] = (resp_mask.sum(axis=1) > 0).sum()
    new_state = state.replace(policy=policy, critic=critic, policy_opt=policy_opt,
                              critic_opt=critic_opt, step=state.step + 1)
    return new_state, metrics


# ---- prompts -----------------------------------------------------------------------------------


class PromptStream:
    """The RL prompts in a seeded per-epoch order; `take(position, n)` is pure in `position`,
    so the data position saved in a checkpoint is all that resume needs."""

    def __init__(self, data_config, language="en"):
        self.seed = int(data_config.get("seed", 0))
        source = data_config.source
        if source == "persona_world":
            from cpe_jax.data import persona_world as pw

            world = pw.make_world(int(data_config.get("world_seed", 0)))
            split = data_config.get("split", "train")
            # The GRM reads the persona's one-line rendering (short prompts for small judges).
            self.items = [
                dict(persona=pw.persona_text(p), question=q["text"], messages=pw.policy_messages(p, q))
                for p in world.personas(split) for q in world.questions(split)
            ]
        elif source == "jsonl":  # data.path: JSONL rows or a verl-layout parquet (personafeedback.load_prompt_set)
            self.items = [
                dict(persona=p.persona, question=p.question, messages=p.messages, reference=p.reference,
                     prompt_id=p.id, source=p.source)
                for p in _read_prompt_file(data_config.get("path"), language)
            ]
        else:
            raise UserError(f"config field data.source: {source!r} is not one of persona_world, jsonl")
        if not self.items:
            raise UserError("config field data: the prompt set is empty")

    def _order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    def take(self, position, n):
        out = []
        for k in range(position, position + n):
            epoch, offset = divmod(k, len(self.items))
            item = self.items[int(self._order(epoch)[offset])]
            out.append(dict(item, question_id=k))
        return out


def _read_prompt_file(path, language):
    """The RL prompts of `data.path`; an unset path is a config error, not a missing file ''."""
    from cpe_jax.data.personafeedback import load_prompt_set

    if not path:
        raise UserError("config field data.path: set it to a JSONL file of {persona, question} rows or a "
                        "verl-layout parquet (e.g. the paper's RL_data/train.parquet)")
    return load_prompt_set(path, language)


# ---- config validation ---------------------------------------------------------------------------


def validate_config(config, num_devices):
    """Every mistake in the config gets exit code 2 naming the field (see cpe_jax.config.check)."""
    from cpe_jax.config import check
    from cpe_jax.rl.edits import check_edit_settings

    check_edit_settings(config.edit.strategy, config.edit.ratio)
    check(bool(config.policy), "policy", "set it to the SFT policy (a Hugging Face directory or cpe_jax checkpoint)")
    p = config.ppo
    check(p.lr_schedule in ("constant", "cosine"), "ppo.lr_schedule", "must be 'constant' or 'cosine'")
    for field in ("prompts_per_step", "rollouts_per_prompt", "mini_batch_size", "epochs", "total_steps"):
        value = p[field] if field in p else config[field]
        check(isinstance(value, int) and value >= 1, field if field in config else f"ppo.{field}",
              f"must be a positive integer, got {value!r}")
    check(p.prompts_per_step % p.mini_batch_size == 0, "ppo.mini_batch_size",
          f"{p.mini_batch_size} does not divide ppo.prompts_per_step={p.prompts_per_step}")
    rows = 2 * p.prompts_per_step * p.rollouts_per_prompt
    rows_per_mb = rows // (p.prompts_per_step // p.mini_batch_size)
    if p.micro_batch_size:
        check(rows_per_mb % p.micro_batch_size == 0, "ppo.micro_batch_size",
              f"{p.micro_batch_size} does not divide the {rows_per_mb} rows of a mini-batch")
    check(p.loss_agg in ppo.AGG_MODES, "ppo.loss_agg", f"{p.loss_agg!r} is not one of {ppo.AGG_MODES}")
    check(p.kl_kind in ppo.KL_KINDS, "ppo.kl_kind", f"{p.kl_kind!r} is not one of {ppo.KL_KINDS}")
    check(config.edit.pi_e in ("recompute", "sampler"), "edit.pi_e", "must be 'recompute' or 'sampler'")
    check(config.grm.type in ("python", "http", "flax", "bt"), "grm.type", "must be python, http, flax or bt")
    check(config.grm.type != "bt" or config.edit.strategy == "none", "edit.strategy",
          "a Bradley-Terry RM (grm.type = 'bt') writes no critique to edit from; use 'none'")
    check(not config.grm.get("fused") or config.grm.type == "flax", "grm.fused",
          "the single-jit step needs an in-framework GRM (grm.type = 'flax')")
    for field in ("max_prompt_length", "max_response_length"):
        check(config.rollout[field] >= 1, f"rollout.{field}", "must be >= 1")
    check(0 < config.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    check(config.rollout.temperature >= 0, "rollout.temperature", "must be >= 0")
    check(isinstance(config.rollout.get("slots", 0), int) and config.rollout.get("slots", 0) >= 0, "rollout.slots",
          "must be an integer >= 0 (0 = every row of the step at once)")
    from cpe_jax.sharding import make_mesh

    mesh = make_mesh(dict(config.mesh))
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = p.prompts_per_step * p.rollouts_per_prompt
    check(batch % data_parallel == 0, "ppo.prompts_per_step",
          f"the rollout batch {batch} (prompts x rollouts) is not divisible by the {data_parallel} "
          f"data-parallel devices of mesh {dict(mesh.shape)}")
    return mesh


# ---- the loop ------------------------------------------------------------------------------------


def _state_shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


class Trainer:
    """Builds models, optimizers and the jitted step from a config; `run()` trains with resume."""

    def __init__(self, config, workdir):
        import cpe_jax
        from cpe_jax.checkpoints import TrainCheckpointer
        from cpe_jax.metrics import MetricsWriter
        from cpe_jax.models.heads import ValueModel
        from cpe_jax.rl.rollout import Rollout
        from cpe_jax.sft import init_opt_state, make_optimizer
        from cpe_jax.tokenizer import eos_token_ids, load_tokenizer, pad_token_id

        self.config, self.workdir = config, workdir
        self.mesh = validate_config(config, jax.device_count())
        os.makedirs(workdir, exist_ok=True)
        dtype = config.get("dtype") or None
        self.tokenizer = load_tokenizer(config.get("tokenizer") or config.policy)
        policy = cpe_jax.load_model(config.policy, mesh=self.mesh, dtype=dtype)
        critic_base = cpe_jax.load_model(config.get("critic") or config.policy, mesh=self.mesh, dtype=dtype)
        if config.get("remat"):
            policy.config = policy.config.replace(remat=config.remat)
            critic_base.config = critic_base.config.replace(remat=config.remat)
        critic = ValueModel.from_policy(critic_base, rngs=nnx.Rngs(config.seed))
        self.policy_config = policy.config
        self.policy_graphdef, policy_state = nnx.split(policy)
        self.critic_graphdef, critic_state = nnx.split(critic)
        p = config.ppo
        self.kl_on = bool(p.kl_coef) and (p.kl_in_reward or p.kl_loss)
        ref_state = jax.tree.map(jnp.copy, policy_state) if self.kl_on else {}

        self.policy_tx, self.actor_lr = make_optimizer(_optimizer_fields(config, p.actor_lr), p.lr_schedule)
        self.critic_tx, self.critic_lr = make_optimizer(_optimizer_fields(config, p.critic_lr), p.lr_schedule)
        with jax.set_mesh(self.mesh):
            state = TrainState(
                policy=policy_state, critic=critic_state, ref=ref_state,
                policy_opt=init_opt_state(self.policy_tx, policy_state, self.mesh),
                critic_opt=init_opt_state(self.critic_tx, critic_state, self.mesh),
                kl_coef=jnp.asarray(p.kl_coef, jnp.float32), step=jnp.zeros((), jnp.int32),
            )
        state = state.replace(kl_coef=jax.device_put(state.kl_coef, _replicated(self.mesh)),
                              step=jax.device_put(state.step, _replicated(self.mesh)))
        self.state_sharding = _state_shardings(state)
        self.checkpointer = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
        self.position = 0
        latest = self.checkpointer.latest_step()
        if latest is not None:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
            state, extra = self.checkpointer.restore(abstract)
            self.position = int(extra["data_position"])
            log.info("resumed from step %d (data position %d)", latest, self.position)
        self.state = state

        self.settings = StepSettings(
            prompt_length=config.rollout.max_prompt_length,
            response_length=config.rollout.max_response_length,
            edit_prompt_length=config.edit.max_prompt_length,
            num_mini_batches=p.prompts_per_step // p.mini_batch_size,
            micro_batch_size=p.micro_batch_size or 0,
            epochs=p.epochs,
            clip_eps_low=p.clip_eps_low, clip_eps_high=p.clip_eps_high,
            dual_clip_c=p.get("dual_clip_c") or None,
            edit_clip_eps_low=config.edit.get("clip_eps_low"), edit_clip_eps_high=config.edit.get("clip_eps_high"),
            value_clip=p.value_clip, gamma=p.gamma, lam=p.lam, whiten_advantages=p.whiten_advantages,
            loss_agg=p.loss_agg, entropy_coef=p.entropy_coef, kl_in_reward=self.kl_on and p.kl_in_reward,
            kl_loss=self.kl_on and p.kl_loss, kl_kind=p.kl_kind, pi_e_source=config.edit.pi_e,
        )
        step_fn = partial(train_step, self.policy_graphdef, self.critic_graphdef, self.policy_tx,
                          self.critic_tx, self.settings)
        self._train_step = jax.jit(step_fn, donate_argnums=(0,),
                                   out_shardings=(self.state_sharding, _replicated(self.mesh)))
        self.data = PromptStream(config.data, config.language)
        vocab_size = self.policy_config.vocab_size
        eos = eos_token_ids(self.tokenizer, config.policy, vocab_size)
        pad_id = pad_token_id(self.tokenizer, vocab_size, eos)
        self.rollout = self.fused = None
        if config.grm.type == "flax" and config.grm.get("fused", False):
            from cpe_jax.rl.fused import FusedCPEStep  # rollout, GRM, edits and update in one jit

            self.fused = FusedCPEStep(self)
        else:
            scorer = build_scorer(config)
            self.rollout = Rollout(config, self.policy_graphdef, self.tokenizer, scorer, eos, pad_id, vocab_size)
        self.metrics = MetricsWriter(workdir, resume_step=int(self.state.step))

    @property
    def step(self):
        return int(self.state.step)

    def train_one_step(self):
        from cpe_jax.sharding import shard_batch

        cfg, p = self.config, self.config.ppo
        t_start = time.perf_counter()
        step = self.step
        step_key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        prompts = self.data.take(self.position, p.prompts_per_step)
        examples, row_ids = [], []
        for prompt in prompts:
            for j in range(p.rollouts_per_prompt):
                examples.append(prompt)
                row_ids.append(prompt["question_id"] * p.rollouts_per_prompt + j)
        if self.fused is not None:
            self.state, metrics = self.fused.run(self.state, examples, row_ids, step_key)
            self.position += p.prompts_per_step
            metrics.update({"actor/lr": float(self.actor_lr(step)), "critic/lr": float(self.critic_lr(step)),
                            "data/position": self.position})
            return self.step, metrics
        rollout = self.rollout.run(self.state.policy, examples, row_ids, step_key, self.mesh)

        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):
            batch = shard_batch(self.mesh, rollout.arrays)
            self.state, step_metrics = self._train_step(self.state, batch, jax.random.fold_in(step_key, 3))
            step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        train_time = time.perf_counter() - t0
        self.position += p.prompts_per_step

        metrics = dict(rollout.metrics)
        metrics.update(step_metrics)
        metrics["time/train"] = train_time
        total = time.perf_counter() - t_start
        metrics["time/step"] = total
        generated = float(rollout.arrays["orig_mask"].sum() + rollout.arrays["edit_mask"].sum())
        metrics["perf/tokens_per_s"] = (generated + step_metrics["train/tokens"]) / total
        n_params = self.policy_config.num_parameters
        flops = 2 * n_params * generated + 6 * 2 * n_params * step_metrics["train/tokens"] * p.epochs
        metrics["perf/flops"] = flops
        peak = self.config.get("peak_flops_per_device") or PEAK_FLOPS.get(jax.devices()[0].device_kind)
        if peak:
            metrics["perf/mfu"] = flops / total / (peak * self.mesh.devices.size)
        metrics["actor/lr"] = float(self.actor_lr(step))
        metrics["critic/lr"] = float(self.critic_lr(step))
        metrics["data/position"] = self.position
        return self.step, metrics

    def save(self, force=False):
        self.checkpointer.save(self.step, self.state, extra={"data_position": self.position}, force=force)

    def stop_on_nonfinite(self, step, count):
        """End the run without saving the broken state: earlier checkpoints stay the latest."""
        self.checkpointer.wait()
        latest = self.checkpointer.latest_step()
        self.metrics.close()
        resume = f"the latest checkpoint is step {latest}" if latest is not None else "no checkpoint was written"
        raise UserError(f"step {step}: {int(count)} non-finite log-probs, values or losses "
                        f"(numerics/nonfinite); stopped without saving this step, {resume}")

    def stop_on_judge_unavailable(self, error):
        """The GRM gave no answer beyond its retry budget: this step is not trained on. Save the last
        finished step and end with exit code 3 (JudgeUnavailable); rerunning resumes from it."""
        self.checkpointer.wait()
        if self.checkpointer.latest_step() != self.step:
            self.save(force=True)
            self.checkpointer.wait()
        self.metrics.close()
        raise JudgeUnavailable(f"step {self.step + 1} not trained, checkpoint saved at step {self.step}; "
                               f"{error.reason}", done=self.step, remaining=self.config.total_steps - self.step,
                               unit="steps") from None

    def run(self, progress=True):
        from cpe_jax.checkpoints import PreemptionGuard, save_model
        from cpe_jax.metrics import progress_bar

        cfg = self.config
        bar = progress_bar(total=cfg.total_steps, initial=self.step, desc="cpe train", enabled=progress)
        with PreemptionGuard() as guard:
            while self.step < cfg.total_steps and not guard.requested:
                try:
                    step, metrics = self.train_one_step()
                except JudgeUnavailable as e:
                    self.stop_on_judge_unavailable(e)
                self.metrics.write(step, metrics)
                if metrics.get("numerics/nonfinite", 0) > 0:
                    self.stop_on_nonfinite(step, metrics["numerics/nonfinite"])
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('orig/reward', float('nan')):.3f}")
                if step % cfg.save_every == 0 or step == cfg.total_steps or guard.requested:
                    self.save(force=True)
            bar.close()
            if guard.requested:
                log.warning("SIGTERM: saved step %d, exiting", self.step)
        self.checkpointer.wait()
        if self.step >= cfg.total_steps:
            policy = nnx.merge(self.policy_graphdef, self.state.policy)
            policy.generation_config = None
            save_model(policy, os.path.join(self.workdir, "final"),
                       tokenizer_dir=cfg.get("tokenizer") or cfg.policy)
        self.metrics.close()
        self.checkpointer.close()
        return self.step


def _optimizer_fields(config, lr):
    """The fields `sft.make_optimizer` reads, for one of the two PPO optimizers."""
    import ml_collections

    p = config.ppo
    return ml_collections.ConfigDict(dict(lr=lr, warmup_steps=p.warmup_steps, total_steps=config.total_steps,
                                          grad_clip=p.grad_clip, weight_decay=p.weight_decay, min_lr_ratio=0.0))


def build_scorer(config):
    """The GRM scorer of the `grm` config block. A flax GRM with `grm.mode = "expected"` scores by
    expected value over -5..5 (never unreadable, which suits a small distilled GRM); `grm.type =
    "bt"` is a Bradley-Terry RM at `grm.path` (a reward, no critique); every other GRM writes its
    scores as text, parsed by `GRMScorer`."""
    from cpe_jax.config import check
    from cpe_jax.reward.grm import GRMScorer
    from cpe_jax.rl.rollout import build_judge

    g = config.grm
    mode = g.get("mode", "text")
    check(mode in ("text", "expected"), "grm.mode", f"{mode!r} is not one of text, expected")
    check(mode == "text" or g.type == "flax", "grm.mode", "'expected' needs grm.type = 'flax'")
    weights = dict(g.weights) if g.get("weights") else None
    if g.type == "bt":
        from cpe_jax.errors import require_path
        from cpe_jax.reward.bt import BTRewardModel, BTScorer
        from cpe_jax.tokenizer import load_tokenizer

        path = require_path(g.path, "grm.path")
        p = config.ppo
        return BTScorer(BTRewardModel.load(path), load_tokenizer(path), language=config.language,
                        batch_size=p.prompts_per_step * p.rollouts_per_prompt)
    if mode == "expected":
        import cpe_jax
        from cpe_jax.errors import require_path
        from cpe_jax.reward.flax_grm import FlaxGRMScorer
        from cpe_jax.tokenizer import load_tokenizer

        path = require_path(g.path, "grm.path")
        p = config.ppo
        return FlaxGRMScorer(cpe_jax.load_model(path), load_tokenizer(path), language=config.language,
                             temperature=g.temperature, critique_temperature=g.critique_temperature,
                             weights=weights, max_tokens=g.get("max_tokens", 1024),
                             max_batch_size=p.prompts_per_step * p.rollouts_per_prompt)
    return GRMScorer(build_judge(g), language=config.language, temperature=g.temperature,
                     critique_temperature=g.critique_temperature, weights=weights,
                     max_tokens=g.get("max_tokens", 1024))


def _replicated(mesh):
    from cpe_jax.sharding import replicated

    return replicated(mesh)


def main(argv):
    """`cpe-jax train --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`."""
    from cpe_jax.config import parse_config_flags

    config, workdir = parse_config_flags(argv, prog="cpe-jax train")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    trainer = Trainer(config, workdir)
    return 0 if trainer.run() >= 0 else 1


def default_config():
    """The paper's PPO/CPE defaults (DESIGN.md); configs/*.py start from this and override."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.policy = ""  # HF directory or cpe_jax checkpoint of the SFT policy
    c.critic = ""  # defaults to the policy (the paper initialises the critic from the SFT policy)
    c.tokenizer = ""  # defaults to the policy directory
    c.dtype = ""  # compute dtype; "" = bfloat16 on TPU, float32 elsewhere
    c.remat = ""  # policy/critic rematerialization: none | full | dots | dots_no_batch ("" = as loaded)
    c.model_preset = ""  # architecture `cpe-jax plan` assumes before the checkpoint exists, e.g. qwen2.5-7b
    c.language = "en"
    c.seed = 0
    c.total_steps = 100
    c.save_every = 10
    c.keep_checkpoints = 3
    c.peak_flops_per_device = 0.0  # for the MFU estimate where the device is not in PEAK_FLOPS
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.data = ml_collections.ConfigDict()
    c.data.source = "jsonl"  # "jsonl" rows {persona, question[, messages]} or "persona_world"
    c.data.path = ""
    c.data.seed = 0
    c.data.world_seed = 0
    c.data.split = "train"

    c.rollout = ml_collections.ConfigDict()
    c.rollout.max_prompt_length = 2048
    c.rollout.max_response_length = 2048
    c.rollout.temperature = 0.9
    c.rollout.top_p = 0.9
    c.rollout.top_k = 0
    c.rollout.slots = 0  # decode slots of the rollout engine; 0 = every row of the step at once

    c.grm = ml_collections.ConfigDict()
    c.grm.type = "http"  # "python" (grm.judge_fn), "http" (OpenAI-compatible), "flax" or "bt" (grm.path)
    c.grm.judge_fn = ""
    c.grm.base_url = ""
    c.grm.model_name = ""
    c.grm.api_key_env = "OPENAI_API_KEY"
    c.grm.max_concurrency = 8
    c.grm.timeout = 60.0  # http: seconds per request; timeouts, connection errors, 429 and 5xx are retried
    c.grm.max_retries = 5  # http: beyond them the step is not trained on: checkpoint, exit code 3
    c.grm.backoff_base = 0.5  # http: first retry delay in seconds, doubled each retry
    c.grm.max_consecutive_failures = 8  # http: no-answers in a row before the rest of the batch is not sent
    c.grm.path = ""
    c.grm.mode = "text"  # flax GRM only: "expected" = expected scores over -5..5 (never unreadable)
    c.grm.max_tokens = 1024
    c.grm.temperature = 0.0  # the reward is judged greedily
    c.grm.critique_temperature = 0.9  # the critique that drives editing is sampled
    c.grm.fused = False  # grm.type "flax" only: the whole step (rollout, GRM, edits, update) as ONE jit
    c.grm.max_prompt_length = 2048  # fused step: GRM prompt before the response (rubric, persona, question)
    c.grm.weights = ml_collections.ConfigDict({"helpfulness": 0.35, "personalization": 0.40, "naturalness": 0.25})

    c.edit = ml_collections.ConfigDict()
    c.edit.strategy = "random"  # none | random | reward_rank | conditional | batch_rank
    c.edit.ratio = 0.5
    c.edit.max_prompt_length = 4096  # post-edit prompt: question + original reply + critique
    c.edit.temperature = 0.9
    c.edit.pi_e = "recompute"  # or "sampler": log-probs of edited tokens in their edit context
    c.edit.clip_eps_low = ml_collections.config_dict.placeholder(float)
    c.edit.clip_eps_high = ml_collections.config_dict.placeholder(float)

    c.ppo = ml_collections.ConfigDict()
    c.ppo.prompts_per_step = 128
    c.ppo.rollouts_per_prompt = 4
    c.ppo.mini_batch_size = 64  # in prompts, as in verl
    c.ppo.micro_batch_size = 0  # rows per gradient-accumulation chunk; 0 = whole mini-batch
    c.ppo.epochs = 1
    c.ppo.actor_lr = 1e-6
    c.ppo.critic_lr = 1e-5
    c.ppo.lr_schedule = "constant"
    c.ppo.warmup_steps = 0
    c.ppo.weight_decay = 0.01
    c.ppo.grad_clip = 1.0
    c.ppo.clip_eps_low = 0.2
    c.ppo.clip_eps_high = 0.2
    c.ppo.dual_clip_c = 0.0  # 0 = off
    c.ppo.value_clip = 0.5
    c.ppo.gamma = 1.0
    c.ppo.lam = 1.0
    c.ppo.whiten_advantages = True
    c.ppo.loss_agg = "token-mean"
    c.ppo.entropy_coef = 0.0
    c.ppo.kl_coef = 0.0  # the paper uses no KL
    c.ppo.kl_in_reward = False
    c.ppo.kl_loss = False
    c.ppo.kl_kind = "k3"
    return c
