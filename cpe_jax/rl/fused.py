"""The whole CPE step as ONE jit when the GRM is a Flax model judging in expected-score mode.

The host path (`rollout.py`) decodes every response to text, builds the GRM and post-edit prompts
as text and tokenizes them again between jits. Here the host tokenizes only the fixed text around
the generated parts, once per step, and everything else happens inside one jitted function:

    policy sample -> [GRM prefix | response | GRM suffix + "<critique>\\n"] -> GRM samples a critique
    -> expected scores on [GRM prompt | critique | "\\n</critique>\\n<scores>\\n"] (the reward)
    -> [edit prefix | response | edit middle | critique | edit suffix] -> policy samples the edit
    -> GRM critique + expected scores of the edit -> select_edits -> `rl.update.train_step`

Prompts are assembled at the TOKEN level: the pieces are concatenated along time and a stable sort
of the validity mask moves every row's valid tokens to the right end (a left-padded prompt).

Known differences from the host path, all harmless for expected-score rewards (the scores are
forced and read as probabilities, never parsed from text):
- BPE merges never cross a piece boundary (the host tokenizes the whole prompt, so e.g. a reply
  ending in a space may merge with the next newline there).
- Generated text is not escaped: `neutralize_markup` works on text, so a response containing
  `<scores>` or a field marker reaches the GRM as the tokens the policy wrote.
- Responses are not whitespace-stripped; their EOS token is dropped.
- The critique ends at the first occurrence of the token sequence of "</critique>" (or at EOS);
  sampling runs to EOS or `grm.max_tokens`, since a multi-token stop string cannot end the loop.
- One critique per original, sampled at `grm.critique_temperature`, both drives the edit and
  precedes the reward's score lines (the host path judges the reward with a second, greedy
  critique); the edits' critiques are sampled at `grm.temperature`.
"""

import dataclasses
import logging
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpe_jax.data import prompts as templates
from cpe_jax.data.padding import left_pad
from cpe_jax.data.prompts import DIMENSIONS
from cpe_jax.errors import UserError
from cpe_jax.reward.flax_grm import SCORES_OPENING, ScoreTokenTables, build_score_tables, expected_scores
from cpe_jax.reward.grm import check_weights, combine_scores
from cpe_jax.rl.batch import (RolloutBatch, edit_selection_metrics, host_floats, rollout_sample_configs, row_keys, score_metrics,
                              stream_key)
from cpe_jax.rl.edits import select_edits
from cpe_jax.rl.update import train_step
from cpe_jax.rl.rollout import prompt_row_name
from cpe_jax.sampling import SampleConfig, sample
from cpe_jax.tokenizer import apply_chat_template, check_token_ids

log = logging.getLogger(__name__)

CRITIQUE_OPENING = "<critique>\n"
CRITIQUE_CLOSE = "</critique>"
# What follows the critique before the forced score lines (the host writes "critique\n</critique>...").
SCORE_OPENING = "\n" + SCORES_OPENING
# Placeholders for the generated parts when rendering templates; private-use characters never
# occur in real text and pass through `neutralize_markup` untouched.
_SLOT = "\ue000{}\ue001"


# ---- token-level assembly (pure) -------------------------------------------------------------


def concat_pieces(pieces, pad_id=0):
    """Left-padded concatenation of variable-length pieces [(tokens [B, W_i], mask [B, W_i]), ...].

    Each piece may be padded anywhere (left-padded prompts, right-padded samples). Returns tokens
    and a bool mask [B, sum W_i] holding, per row, the valid tokens of all pieces in order at the
    right end: a stable sort of the mask keeps the order among valid tokens.
    """
    tokens = jnp.concatenate([jnp.asarray(t).astype(jnp.int32) for t, _ in pieces], axis=1)
    mask = jnp.concatenate([jnp.asarray(m).astype(bool) for _, m in pieces], axis=1)
    order = jnp.argsort(mask, axis=1, stable=True)  # False (padding) first, valid tokens last
    tokens = jnp.take_along_axis(tokens, order, axis=1)
    mask = jnp.take_along_axis(mask, order, axis=1)
    return jnp.where(mask, tokens, pad_id), mask


def keep_last(tokens, mask, width, pad_id=0):
    """The last `width` columns of a left-padded batch (longer rows lose their first tokens, as in
    `data.padding.left_pad`); returns (tokens, mask, truncated bool [B])."""
    truncated = jnp.sum(mask, axis=1) > width
    if tokens.shape[1] >= width:
        return tokens[:, -width:], mask[:, -width:], truncated
    extra = width - tokens.shape[1]
    return (jnp.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id),
            jnp.pad(mask, ((0, 0), (extra, 0))), truncated)


def cut_at(tokens, mask, stop_sequence, end_ids):
    """Mask of the tokens before the first `stop_sequence` (a tuple of ids) and without end tokens."""
    n = tokens.shape[1]
    keep = mask.astype(bool)
    if end_ids:
        keep &= ~jnp.isin(tokens, jnp.asarray(end_ids, jnp.int32))
    k = len(stop_sequence)
    if k == 0 or k > n:
        return keep
    match = jnp.ones((tokens.shape[0], n - k + 1), bool)
    for j, token in enumerate(stop_sequence):
        match &= (tokens[:, j: n - k + 1 + j] == token) & mask[:, j: n - k + 1 + j]
    first = jnp.where(jnp.any(match, axis=1), jnp.argmax(match, axis=1), n)
    return keep & (jnp.arange(n)[None, :] < first[:, None])


# ---- the step ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FusedSettings:
    """Static settings of the fused step (hashable: part of the jit cache key)."""

    policy_sample: SampleConfig
    edit_sample: SampleConfig
    critique_sample: SampleConfig  # originals' critiques (they drive the edit)
    edit_critique_sample: SampleConfig  # edits' critiques (they only precede the score lines)
    critique_close: tuple  # token ids of "</critique>"
    edit_prompt_length: int
    strategy: str
    ratio: float
    weights: tuple  # ((dimension, weight), ...)


def judge(grm_graphdef, grm_state, tables, fs: FusedSettings, sample_config, prefix, response_tokens,
          response_mask, suffix, rng):
    """GRM critique and expected scores of one response per row, all on tokens.

    Returns (scores {dimension: [B], "reward": [B]}, critique tokens [B, C], critique mask, and
    the scored prefix tokens and mask).
    """
    pad = sample_config.pad_token_id
    response = (response_tokens, cut_at(response_tokens, response_mask, (), fs.policy_sample.end_token_ids))
    prompt, prompt_mask = concat_pieces([prefix, response, suffix], pad)
    out = sample(grm_graphdef, grm_state, prompt, prompt_mask, rng, sample_config)
    critique_mask = cut_at(out.tokens, out.mask, fs.critique_close, sample_config.end_token_ids)
    opening = jnp.broadcast_to(tables.score_opening, (prompt.shape[0], tables.score_opening.shape[0]))
    scored, scored_mask = concat_pieces(
        [(prompt, prompt_mask), (out.tokens, critique_mask), (opening, jnp.ones(opening.shape, bool))], pad)
    found = expected_scores(grm_graphdef, grm_state, scored, scored_mask, tables.score)
    scores = {dim: found[dim] for dim in DIMENSIONS}
    scores["reward"] = combine_scores(scores, dict(fs.weights))
    return scores, out.tokens, critique_mask, scored, scored_mask


class GRMTables(NamedTuple):
    """The GRM's constant token arrays: the forced score tables and the tokens of SCORE_OPENING."""

    score: ScoreTokenTables
    score_opening: jax.Array


def fused_rollout(policy_graphdef, grm_graphdef, fs: FusedSettings, policy_state, grm_state, tables,
                  pieces, rng):
    """Everything of a CPE step before the PPO update, on tokens; pure and jittable.

    pieces: the host-tokenized fixed text per row (see `PieceEncoder.encode`). rng: the step key.
    Returns (the `RolloutBatch` for `train_step`, extras: GRM prefixes and critiques for inspection).
    """
    pad = fs.policy_sample.pad_token_id
    row_ids = pieces["row_ids"].astype(jnp.uint32)

    def keys(stream):  # per-row keys as in the host rollout: a row's samples ignore the batch
        return row_keys(rng, stream, row_ids)

    prompt = (pieces["prompt_tokens"], pieces["prompt_mask"])
    grm_prefix = (pieces["grm_prefix_tokens"], pieces["grm_prefix_mask"])
    grm_suffix = (pieces["grm_suffix_tokens"], pieces["grm_suffix_mask"])
    orig = sample(policy_graphdef, policy_state, *prompt, keys("rollout"), fs.policy_sample)
    orig_scores, critique, critique_mask, orig_prefix, orig_prefix_mask = judge(
        grm_graphdef, grm_state, tables, fs, fs.critique_sample, grm_prefix, orig.tokens, orig.mask,
        grm_suffix, keys("critique"))
    b, r = orig.tokens.shape
    metrics = score_metrics("orig", orig_scores, jnp.ones((b,), bool), orig.mask)
    metrics["orig/stopped_frac"] = jnp.mean(orig.stopped)
    metrics["grm/failure_rate"] = jnp.zeros(())  # expected scores cannot fail to parse
    metrics["grm/critique_length"] = jnp.mean(jnp.sum(critique_mask, axis=1))
    extras = dict(orig_prefix=orig_prefix, orig_prefix_mask=orig_prefix_mask, critique=critique,
                  critique_mask=critique_mask)
    generated = jnp.sum(orig.mask)

    batch = dict(
        prompt_tokens=pieces["prompt_tokens"], prompt_mask=pieces["prompt_mask"],
        orig_tokens=orig.tokens, orig_mask=orig.mask, orig_sampler_logprobs=orig.logprobs,
        orig_rewards=orig_scores["reward"].astype(jnp.float32),
        orig_valid=jnp.ones((b,), bool),
        edit_prompt_tokens=jnp.full((b, fs.edit_prompt_length), pad, jnp.int32),
        edit_prompt_mask=jnp.zeros((b, fs.edit_prompt_length), bool),
        edit_tokens=jnp.full((b, r), pad, jnp.int32), edit_mask=jnp.zeros((b, r), bool),
        edit_sampler_logprobs=jnp.zeros((b, r), jnp.float32), edit_rewards=jnp.zeros((b,), jnp.float32),
        keep_edit=jnp.zeros((b,), bool),
    )
    if fs.strategy != "none":
        edit_prompt, edit_prompt_mask = concat_pieces([
            (pieces["edit_prefix_tokens"], pieces["edit_prefix_mask"]),
            (orig.tokens, cut_at(orig.tokens, orig.mask, (), fs.policy_sample.end_token_ids)),
            (pieces["edit_middle_tokens"], pieces["edit_middle_mask"]),
            (critique, critique_mask),
            (pieces["edit_suffix_tokens"], pieces["edit_suffix_mask"]),
        ], pad)
        edit_prompt, edit_prompt_mask, edit_truncated = keep_last(edit_prompt, edit_prompt_mask,
                                                                  fs.edit_prompt_length, pad)
        edit = sample(policy_graphdef, policy_state, edit_prompt, edit_prompt_mask, keys("edit"), fs.edit_sample)
        edit_scores, _, _, edit_prefix, edit_prefix_mask = judge(
            grm_graphdef, grm_state, tables, fs, fs.edit_critique_sample, grm_prefix, edit.tokens, edit.mask,
            grm_suffix, keys("edit_critique"))
        edit_valid = jnp.sum(critique_mask, axis=1) > 0  # as on the host: no critique, no edit
        keep_edit = select_edits(
            fs.strategy, rewards_orig=orig_scores["reward"], rewards_edit=edit_scores["reward"],
            question_ids=pieces["question_ids"], ratio=fs.ratio, key=stream_key(rng, "edit_selection"),
            valid_orig=jnp.ones((b,), bool), valid_edit=edit_valid,
        )
        batch.update(edit_prompt_tokens=edit_prompt, edit_prompt_mask=edit_prompt_mask, edit_tokens=edit.tokens,
                     edit_mask=edit.mask, edit_sampler_logprobs=edit.logprobs,
                     edit_rewards=edit_scores["reward"].astype(jnp.float32), keep_edit=keep_edit)
        metrics.update(score_metrics("edit", edit_scores, edit_valid, edit.mask))
        metrics.update(edit_selection_metrics(keep_edit, edit_valid, edit_scores["reward"]))
        metrics["data/truncated_edit_prompts"] = jnp.sum(edit_truncated)
        extras.update(edit_prefix=edit_prefix, edit_prefix_mask=edit_prefix_mask, edit_prompt=edit_prompt,
                      edit_prompt_mask=edit_prompt_mask, edit_rewards=edit_scores["reward"])
        generated = generated + jnp.sum(edit.mask)
    metrics["rollout/generated_tokens"] = generated
    extras["orig_rewards"] = orig_scores["reward"]
    return RolloutBatch(arrays=batch, metrics=metrics), extras


def fused_step(policy_graphdef, critic_graphdef, grm_graphdef, policy_tx, critic_tx, settings, fs, tables,
               state, grm_state, pieces, rng, *, with_samples=False):
    """(train state, GRM state, pieces, step key) -> (new state, metrics): rollout, GRM, edits and
    the PPO update in one pure function, for ONE jit with no host round trip.

    with_samples: also return the rollout's tokens (responses, critiques, edits, the GRM prefixes
    that were scored, rewards) for logging and inspection.
    """
    rollout, extras = fused_rollout(policy_graphdef, grm_graphdef, fs, state.policy, grm_state, tables, pieces, rng)
    batch, metrics = rollout.arrays, dict(rollout.metrics)
    state, train_metrics = train_step(policy_graphdef, critic_graphdef, policy_tx, critic_tx, settings, state,
                                      batch, stream_key(rng, "update"))
    metrics.update(train_metrics)
    if not with_samples:
        return state, metrics
    samples = dict(extras, orig_tokens=batch["orig_tokens"], orig_mask=batch["orig_mask"],
                   edit_tokens=batch["edit_tokens"], edit_mask=batch["edit_mask"], keep_edit=batch["keep_edit"])
    return state, metrics, samples


# ---- host side: the fixed text pieces ---------------------------------------------------------


def _split_rendered(tokenizer, messages, slots):
    """The chat-template text of `messages` split around each slot placeholder, in order."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = []
    for slot in slots:
        head, found, text = text.partition(slot)
        if not found:
            raise UserError(f"the chat template dropped the placeholder of a generated field ({slot!r})")
        parts.append(head)
    return parts + [text]


def _encode(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


class PieceEncoder:
    """Tokenizes the fixed text around the generated parts of every row, once per step.

    Widths are static (config), so the fused step compiles once: policy prompt `prompt_length`,
    GRM and edit prefixes `grm_prefix_length` / `edit_prefix_length` (left-padded, longer ones keep
    their last tokens), and the constant suffixes exactly as long as they tokenize.
    """

    def __init__(self, policy_tokenizer, grm_tokenizer, *, language, prompt_length, grm_prefix_length,
                 edit_prefix_length, pad_id, vocab_size, grm_vocab_size, data_path=None, prompt_style="full"):
        self.policy_tokenizer, self.grm_tokenizer = policy_tokenizer, grm_tokenizer
        self.vocab_size, self.grm_vocab_size = int(vocab_size), int(grm_vocab_size)
        self.data_path = data_path
        self.language = language
        self.prompt_style = prompt_style
        self.prompt_length, self.grm_prefix_length = prompt_length, grm_prefix_length
        self.edit_prefix_length = edit_prefix_length
        self.pad_id = int(pad_id)
        # The suffixes hold no row data: measure them once on a placeholder row.
        _, grm_suffix = self.grm_text("persona", "question")
        _, middle, suffix = self.edit_text("question")
        self.grm_suffix = _encode(grm_tokenizer, grm_suffix)
        self.edit_middle = _encode(policy_tokenizer, middle)
        self.edit_suffix = _encode(policy_tokenizer, suffix)

    def grm_text(self, persona, question):
        """(GRM prompt text before the response, text after it up to the critique's first token)."""
        slot = _SLOT.format("RESPONSE")
        messages = templates.grm_messages(persona, question, slot, language=self.language, style=self.prompt_style)
        prefix, suffix = _split_rendered(self.grm_tokenizer, messages, [slot])
        return prefix, suffix + CRITIQUE_OPENING

    def edit_text(self, user_prompt):
        """(post-edit prompt text before the original reply, between reply and feedback, after it)."""
        reply, feedback = _SLOT.format("REPLY"), _SLOT.format("FEEDBACK")
        messages = templates.post_edit_messages(user_prompt, reply, feedback, language=self.language)
        return tuple(_split_rendered(self.policy_tokenizer, messages, [reply, feedback]))

    def encode(self, examples, row_ids):
        """examples: {persona, question, question_id, messages} per row -> (pieces dict, truncation counts)."""
        n = len(examples)
        prompts = [apply_chat_template(self.policy_tokenizer, ex["messages"]) for ex in examples]
        grm_prefixes = [_encode(self.grm_tokenizer, self.grm_text(ex["persona"], ex["question"])[0])
                        for ex in examples]
        edit_prefixes = [_encode(self.policy_tokenizer, self.edit_text(ex["messages"][-1]["content"])[0])
                         for ex in examples]
        for ex, prompt, grm_prefix, edit_prefix in zip(examples, prompts, grm_prefixes, edit_prefixes):
            where = prompt_row_name(self.data_path, ex)
            check_token_ids(prompt, self.vocab_size, where)
            check_token_ids(edit_prefix, self.vocab_size, f"the edit prompt of {where}")
            check_token_ids(grm_prefix, self.grm_vocab_size, f"the GRM prompt of {where}")
        pieces, truncated = {}, {}
        for name, seqs, width in (("prompt", prompts, self.prompt_length),
                                  ("grm_prefix", grm_prefixes, self.grm_prefix_length),
                                  ("edit_prefix", edit_prefixes, self.edit_prefix_length)):
            pieces[f"{name}_tokens"], pieces[f"{name}_mask"], truncated[name] = left_pad(seqs, width, self.pad_id)
        for name, ids in (("grm_suffix", self.grm_suffix), ("edit_middle", self.edit_middle),
                          ("edit_suffix", self.edit_suffix)):
            pieces[f"{name}_tokens"], pieces[f"{name}_mask"], _ = left_pad([ids] * n, max(len(ids), 1), self.pad_id)
        pieces["question_ids"] = np.asarray([ex["question_id"] for ex in examples], np.int32)
        pieces["row_ids"] = np.asarray(row_ids, np.uint32)
        return pieces, truncated


def _same_vocabulary(a, b):
    return a.get_vocab() == b.get_vocab()


class FusedCPEStep:
    """The trainer's step when `grm.type == "flax"` and `grm.fused`: one jitted call per step."""

    def __init__(self, trainer):
        import cpe_jax
        from cpe_jax.models.qwen2.params import load_options
        from cpe_jax.sharding import replicated
        from cpe_jax.tokenizer import eos_token_ids, load_tokenizer, pad_token_id

        config = trainer.config
        g, r, e = config.grm, config.rollout, config.edit
        self.config, self.mesh = config, trainer.mesh
        from cpe_jax.errors import require_path

        require_path(g.path, "grm.path")
        grm_tokenizer = load_tokenizer(g.path)
        if not _same_vocabulary(grm_tokenizer, trainer.tokenizer):
            raise UserError(f"config field grm.fused: the GRM at grm.path={g.path!r} has another vocabulary "
                            "than the policy; the fused step joins their tokens directly (set grm.fused=False)")
        grm_model = cpe_jax.load_model(g.path, mesh=self.mesh, dtype=config.dtype, **load_options(config))
        self.grm_graphdef, self.grm_state = nnx.split(grm_model)
        vocab_size = trainer.policy_config.vocab_size
        policy_eos = eos_token_ids(trainer.tokenizer, config.policy, vocab_size)
        pad_id = pad_token_id(trainer.tokenizer, vocab_size, policy_eos)
        grm_eos = eos_token_ids(grm_tokenizer, g.path, grm_model.config.vocab_size)
        policy_sample, edit_sample = rollout_sample_configs(config, policy_eos, pad_id)
        critique = SampleConfig(max_new_tokens=int(g.max_tokens), temperature=float(g.critique_temperature),
                                eos_token_ids=grm_eos, pad_token_id=pad_id)
        self.encoder = PieceEncoder(trainer.tokenizer, grm_tokenizer, language=config.language,
                                    prompt_length=r.max_prompt_length, grm_prefix_length=g.max_prompt_length,
                                    edit_prefix_length=e.max_prompt_length, pad_id=pad_id,
                                    vocab_size=vocab_size, grm_vocab_size=grm_model.config.vocab_size,
                                    data_path=config.data.path, prompt_style=g.prompt_style)
        self.settings = FusedSettings(
            policy_sample=policy_sample,
            edit_sample=edit_sample,
            critique_sample=critique,
            edit_critique_sample=dataclasses.replace(critique, temperature=float(g.temperature)),
            critique_close=tuple(_encode(grm_tokenizer, CRITIQUE_CLOSE)),
            edit_prompt_length=e.max_prompt_length,
            strategy=e.strategy, ratio=float(e.ratio),
            weights=tuple(check_weights(dict(g.weights) if g.get("weights") else None).items()),
        )
        self.tables = GRMTables(build_score_tables(grm_tokenizer, config.language, grm_model.config.vocab_size),
                                jnp.asarray(_encode(grm_tokenizer, SCORE_OPENING), jnp.int32))
        self.compile_count = 0
        step = partial(fused_step, trainer.policy_graphdef, trainer.critic_graphdef, self.grm_graphdef,
                       trainer.policy_tx, trainer.critic_tx, trainer.settings, self.settings, with_samples=True)

        def traced(state, grm_state, tables, pieces, rng):
            self.compile_count += 1  # runs only while tracing
            log.info("compiling the fused CPE step")
            return step(tables, state, grm_state, pieces, rng)

        self._step = jax.jit(traced, donate_argnums=(0,),
                             out_shardings=(trainer.state_sharding, replicated(self.mesh), replicated(self.mesh)))
        self.last_samples = None  # the latest step's rollout tokens (device arrays), see `fused_step`

    def pieces(self, examples, row_ids):
        from cpe_jax.sharding import shard_batch

        pieces, truncated = self.encoder.encode(examples, row_ids)
        return shard_batch(self.mesh, pieces), truncated

    def run(self, state, examples, row_ids, step_key):
        """One step: (state, metrics as floats, with `time/step` and `rollout/generated_tokens`).
        The only host work is tokenizing the fixed text."""
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):
            pieces, truncated = self.pieces(examples, row_ids)
            t_encode = time.perf_counter() - t0
            state, metrics, self.last_samples = self._step(state, self.grm_state, self.tables, pieces, step_key)
            metrics = host_floats(metrics)
        total = time.perf_counter() - t0
        metrics["data/truncated_prompts"] = truncated["prompt"]
        metrics["data/truncated_grm_prefixes"] = truncated["grm_prefix"]
        metrics["data/truncated_edit_prefixes"] = truncated["edit_prefix"]
        metrics["time/encode"] = t_encode
        metrics["time/step"] = total
        return state, metrics
