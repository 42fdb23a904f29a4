"""PPO with Critique-Post-Edit: the prompt stream, config validation and the trainer.

One step:  rollout (jit) -> GRM score + critique (host judge) -> edit rollout (jit) -> GRM score
(host) -> select edits -> `rl.update.train_step` (ONE jit: log-probs, values, pi_e, rewards, GAE,
PPO mini-batch epochs with gradient accumulation, donated state, explicit shardings). With a
Flax GRM and `grm.fused`, `rl.fused` runs all of it as one jit. The loop (checkpoints, resume,
SIGTERM, stops, metrics) is `cpe_jax.train.loop`.

Randomness is `fold_in(key(seed), step)` split into the named streams of `rl.batch.RNG_STREAMS`,
and the data position is saved with every checkpoint, so a resumed run reproduces an
uninterrupted one exactly.
"""

import logging
import os
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpe_jax.errors import UserError
from cpe_jax.rl import ppo
from cpe_jax.rl.batch import host_floats, step_flops, stream_key
from cpe_jax.rl.update import settings_from_config, train_step
from cpe_jax.train.loop import TrainLoop, configure_logging

log = logging.getLogger(__name__)

# Peak dense bf16 FLOP/s per chip, for the MFU estimate (None: unknown device, no MFU).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}


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
    check(p.get("kl_target", 0.0) >= 0, "ppo.kl_target", "must be >= 0 (0 = a fixed kl_coef)")
    check(p.get("kl_horizon", 1.0) > 0, "ppo.kl_horizon", "must be > 0")
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


# ---- the trainer ---------------------------------------------------------------------------------


class Trainer(TrainLoop):
    """Builds models, optimizers and the jitted update from a config; `run()` trains with resume."""

    progress_desc = "cpe train"
    progress_metric = "orig/reward"

    def __init__(self, config, workdir):
        import cpe_jax
        from cpe_jax.models.heads import ValueModel
        from cpe_jax.models.qwen2.params import load_options
        from cpe_jax.rl.rollout import Rollout
        from cpe_jax.sharding import replicated
        from cpe_jax.tokenizer import eos_token_ids, load_tokenizer, pad_token_id
        from cpe_jax.train.optim import init_opt_state, make_optimizer, optimizer_fields
        from cpe_jax.train.state import ActorCriticState, shardings_of

        self.config, self.workdir = config, workdir
        self.total_steps = config.total_steps
        self.mesh = validate_config(config, jax.device_count())
        os.makedirs(workdir, exist_ok=True)
        dtype, options = config.dtype, load_options(config)
        self.tokenizer = load_tokenizer(config.get("tokenizer") or config.policy)
        policy = cpe_jax.load_model(config.policy, mesh=self.mesh, dtype=dtype, **options)
        critic_base = cpe_jax.load_model(config.get("critic") or config.policy, mesh=self.mesh, dtype=dtype, **options)
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

        def optimizer(lr):
            return make_optimizer(optimizer_fields(lr=lr, warmup_steps=p.warmup_steps, total_steps=config.total_steps,
                                                   grad_clip=p.grad_clip, weight_decay=p.weight_decay), p.lr_schedule)

        self.policy_tx, self.actor_lr = optimizer(p.actor_lr)
        self.critic_tx, self.critic_lr = optimizer(p.critic_lr)
        with jax.set_mesh(self.mesh):
            state = ActorCriticState(
                policy=policy_state, critic=critic_state, ref=ref_state,
                policy_opt=init_opt_state(self.policy_tx, policy_state, self.mesh),
                critic_opt=init_opt_state(self.critic_tx, critic_state, self.mesh),
                kl_coef=jnp.asarray(p.kl_coef, jnp.float32), step=jnp.zeros((), jnp.int32),
            )
        state = state.replace(kl_coef=jax.device_put(state.kl_coef, replicated(self.mesh)),
                              step=jax.device_put(state.step, replicated(self.mesh)))
        self.state_sharding = shardings_of(state)
        extra = self.start_checkpoints(workdir, state, keep=config.keep_checkpoints)
        self.position = int(extra["data_position"]) if extra is not None else 0

        self.settings = settings_from_config(config, self.kl_on)
        step_fn = partial(train_step, self.policy_graphdef, self.critic_graphdef, self.policy_tx,
                          self.critic_tx, self.settings)
        self._train_step = jax.jit(step_fn, donate_argnums=(0,),
                                   out_shardings=(self.state_sharding, replicated(self.mesh)))
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

    def step_rows(self):
        """(examples, row ids) of this step: each prompt `rollouts_per_prompt` times, with the row
        ids that seed its samples."""
        p = self.config.ppo
        examples, row_ids = [], []
        for prompt in self.data.take(self.position, p.prompts_per_step):
            for j in range(p.rollouts_per_prompt):
                examples.append(prompt)
                row_ids.append(prompt["question_id"] * p.rollouts_per_prompt + j)
        return examples, row_ids

    def train_one_step(self):
        from cpe_jax.sharding import shard_batch

        cfg, p = self.config, self.config.ppo
        t_start = time.perf_counter()
        step = self.step
        step_key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        examples, row_ids = self.step_rows()
        if self.fused is not None:
            self.state, metrics = self.fused.run(self.state, examples, row_ids, step_key)
        else:
            rollout = self.rollout.run(self.state.policy, examples, row_ids, step_key, self.mesh)
            t0 = time.perf_counter()
            with jax.set_mesh(self.mesh):
                batch = shard_batch(self.mesh, rollout.arrays)
                self.state, step_metrics = self._train_step(self.state, batch, stream_key(step_key, "update"))
                step_metrics = host_floats(step_metrics)
            metrics = dict(rollout.metrics)
            metrics.update(step_metrics)
            metrics["time/train"] = time.perf_counter() - t0
            metrics["rollout/generated_tokens"] = float(rollout.arrays["orig_mask"].sum()
                                                        + rollout.arrays["edit_mask"].sum())
            metrics["time/step"] = time.perf_counter() - t_start
        self.position += p.prompts_per_step
        total = metrics["time/step"]
        generated = metrics["rollout/generated_tokens"]
        metrics["perf/tokens_per_s"] = (generated + metrics["train/tokens"]) / total
        flops = step_flops(self.policy_config, generated, metrics["train/tokens"], p.epochs)
        metrics["perf/flops"] = flops
        peak = cfg.get("peak_flops_per_device") or PEAK_FLOPS.get(jax.devices()[0].device_kind)
        if peak:
            metrics["perf/mfu"] = flops / total / (peak * self.mesh.devices.size)
        metrics["actor/lr"] = float(self.actor_lr(step))
        metrics["critic/lr"] = float(self.critic_lr(step))
        metrics["data/position"] = self.position
        return self.step, metrics

    def checkpoint_extra(self):
        return {"data_position": self.position}

    def save_final(self):
        from cpe_jax.checkpoints import save_model

        policy = nnx.merge(self.policy_graphdef, self.state.policy)
        policy.generation_config = None
        save_model(policy, os.path.join(self.workdir, "final"),
                   tokenizer_dir=self.config.get("tokenizer") or self.config.policy)


def build_scorer(config):
    """The GRM scorer of the `grm` config block. A flax GRM with `grm.mode = "expected"` scores by
    expected value over -5..5 (never unreadable, which suits a small distilled GRM); `grm.type =
    "bt"` is a Bradley-Terry RM at `grm.path` (a reward, no critique); every other GRM writes its
    scores as text, parsed by `GRMScorer`."""
    from cpe_jax.config import check
    from cpe_jax.reward.grm import GRMScorer
    from cpe_jax.reward.judge_factory import judge_from_config

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
                             max_batch_size=p.prompts_per_step * p.rollouts_per_prompt,
                             prompt_style=g.prompt_style)
    return GRMScorer(judge_from_config(g), language=config.language, temperature=g.temperature,
                     critique_temperature=g.critique_temperature, weights=weights,
                     max_tokens=g.get("max_tokens", 1024), prompt_style=g.prompt_style)


def main(argv):
    """`cpe-jax train --config=configs/X.py --workdir=DIR [--config.a.b=v ...]`."""
    from cpe_jax.config import parse_config_flags

    config, workdir = parse_config_flags(argv, prog="cpe-jax train")
    configure_logging()
    trainer = Trainer(config, workdir)
    return 0 if trainer.run() >= 0 else 1


def default_config():
    """The paper's PPO/CPE defaults (DESIGN.md); configs/*.py start from this and override."""
    import ml_collections

    c = ml_collections.ConfigDict()
    c.policy = ""  # HF directory or cpe_jax checkpoint of the SFT policy
    c.critic = ""  # defaults to the policy (the paper initialises the critic from the SFT policy)
    c.tokenizer = ""  # defaults to the policy directory
    c.dtype = ""  # compute dtype; "" = bfloat16 on TPU/GPU and on CPUs with AMX, float32 elsewhere
    c.attention = ""  # auto | xla | cpu_blocked | splash | flash | cudnn ("" = auto: by backend)
    c.scan_layers = None  # decoder layers as one scanned stack; None = on for TPU/GPU, off on CPU
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
    c.grm.prompt_style = "full"  # the GRM prompt: "full" (the paper's rubric) or "compact" (a small GRM's)
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
    c.ppo.kl_target = 0.0  # 0: a fixed kl_coef; > 0: the coefficient adapts towards this KL per token
    c.ppo.kl_horizon = 10000.0  # adaptive KL: rows over which the coefficient moves by up to 20%
    return c
