"""Host side of one CPE step: prompts -> responses -> GRM -> critique -> edits -> scored edits.

Everything heavy runs in jitted functions (the sampler core); this module turns text into
fixed-shape token batches, calls the judge between the jits, and returns plain arrays for the
train step. Shapes are static (prompt and response lengths come from the config) so steady-state
steps never recompile.
"""

import logging
import time

import numpy as np

from cpe_jax.data import prompts as templates
from cpe_jax.data.padding import left_pad
from cpe_jax.reward.grm import GRMScorer, require_answers, score_across_hosts
from cpe_jax.rl.batch import (RolloutBatch, edit_selection_metrics, host_floats, rollout_sample_configs, row_keys,
                              score_metrics, stream_key)
from cpe_jax.rl.edits import select_edits
from cpe_jax.tokenizer import apply_chat_template, check_token_ids

log = logging.getLogger(__name__)


def prompt_row_name(path, example):
    """How an error names a training prompt: its data file and row number (question_id)."""
    return f"{path or 'data'}: prompt row {example['question_id']}"


class Rollout:
    """Generates, judges, edits and selects for one step, with jitted sampling."""

    def __init__(self, config, graphdef, tokenizer, scorer: GRMScorer, eos_ids, pad_id, vocab_size):
        self.config = config
        self.vocab_size = int(vocab_size)
        self.graphdef = graphdef
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.pad_id = int(pad_id)
        self.sample_config, self.edit_sample_config = rollout_sample_configs(config, eos_ids, self.pad_id)
        self.engine = None  # built on the first step, when the policy's parameters and mesh are known

    def _generate(self, state, tokens, mask, keys, sample_config, mesh):
        """Sample every row of the left-padded prompts [N, P] on the slot engine (consecutive rows
        with the same prompt share one prefill); returns a `SampleResult` of host arrays [N, R]."""
        from flax import nnx

        from cpe_jax.engine import Engine
        from cpe_jax.sampling import SampleResult, SamplingParams

        if self.engine is None:
            slots = int(self.config.rollout.get("slots") or 0) or len(tokens)
            self.engine = Engine(nnx.merge(self.graphdef, state), num_slots=slots, mesh=mesh,
                                 eos_token_ids=sample_config.eos_token_ids, pad_token_id=self.pad_id)
        self.engine.set_params(state)
        prompts, counts = [], []
        for row, row_mask in zip(tokens, mask):
            ids = row[row_mask].tolist()
            if prompts and ids == prompts[-1]:
                counts[-1] += 1
            else:
                prompts.append(ids)
                counts.append(1)
        c = sample_config
        params = [SamplingParams(max_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                 top_k=c.top_k, stop_token_ids=c.stop_token_ids, ignore_eos=c.ignore_eos, n=n)
                  for n in counts]
        rows = self.engine.generate(prompts, params, row_keys=keys)
        n, width = len(rows), c.max_new_tokens
        out = SampleResult(tokens=np.full((n, width), self.pad_id, np.int32), mask=np.zeros((n, width), bool),
                           logprobs=np.zeros((n, width), np.float32),
                           sampling_logprobs=np.zeros((n, width), np.float32),
                           lengths=np.zeros((n,), np.int32), stopped=np.zeros((n,), bool))
        for i, row in enumerate(rows):
            length = len(row.token_ids)
            out.tokens[i, :length], out.mask[i, :length] = row.token_ids, True
            out.logprobs[i, :length], out.sampling_logprobs[i, :length] = row.logprobs, row.sampling_logprobs
            out.lengths[i], out.stopped[i] = length, row.stopped
        return out

    def _decode(self, tokens, mask):
        return [self.tokenizer.decode(t[m], skip_special_tokens=True).strip() for t, m in zip(tokens, mask)]

    def run(self, policy_state, examples, row_ids, step_key, mesh) -> RolloutBatch:
        """examples: one dict {persona, question, question_id, messages} per rollout row."""
        cfg = self.config
        timings, metrics = {}, {}
        t0 = time.perf_counter()
        prompt_ids = [apply_chat_template(self.tokenizer, ex["messages"]) for ex in examples]
        for ex, ids in zip(examples, prompt_ids):
            check_token_ids(ids, self.vocab_size, prompt_row_name(cfg.data.path, ex))
        prompt_tokens, prompt_mask, truncated = left_pad(prompt_ids, cfg.rollout.max_prompt_length, self.pad_id)
        metrics["data/truncated_prompts"] = truncated
        result = self._generate(policy_state, prompt_tokens, prompt_mask, row_keys(step_key, "rollout", row_ids),
                                self.sample_config, mesh)
        responses = self._decode(result.tokens, result.mask)
        timings["time/generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # `reference`: the data row's reference answer (verl's reward_model.ground_truth), for scorers that use one.
        judged = [dict(persona=ex["persona"], question=ex["question"], response=r, messages=ex["messages"],
                       reference=ex.get("reference"))
                  for ex, r in zip(examples, responses)]
        strategy = cfg.edit.strategy
        orig = score_across_hosts(self.scorer.score_for_editing if strategy != "none" else self.scorer.score, judged)
        require_answers(orig, "GRM on the responses")  # no answer: JudgeUnavailable, the step is not trained
        timings["time/judge"] = time.perf_counter() - t0

        n = len(examples)
        edit_tokens = np.full((n, cfg.rollout.max_response_length), self.pad_id, np.int32)
        edit_mask = np.zeros_like(edit_tokens, dtype=bool)
        edit_prompt_len = cfg.edit.max_prompt_length
        edit_prompt_tokens = np.full((n, edit_prompt_len), self.pad_id, np.int32)
        edit_prompt_mask = np.zeros_like(edit_prompt_tokens, dtype=bool)
        edit_logprobs = np.zeros(edit_tokens.shape, np.float32)
        edit_rewards = np.full(n, np.nan)
        edit_valid = np.zeros(n, bool)
        edited = [""] * n
        keep_edit = np.zeros(n, bool)
        if strategy != "none":
            t0 = time.perf_counter()
            edit_prompts = []
            for ex, response, critique in zip(examples, responses, orig.critiques):
                user_prompt = ex["messages"][-1]["content"]
                messages = templates.post_edit_messages(user_prompt, response, critique, language=cfg.language)
                edit_prompts.append(check_token_ids(apply_chat_template(self.tokenizer, messages), self.vocab_size,
                                                    f"the edit prompt of {prompt_row_name(cfg.data.path, ex)}"))
            edit_prompt_tokens, edit_prompt_mask, truncated = left_pad(edit_prompts, edit_prompt_len, self.pad_id)
            metrics["data/truncated_edit_prompts"] = truncated
            edit = self._generate(policy_state, edit_prompt_tokens, edit_prompt_mask, row_keys(step_key, "edit", row_ids),
                                  self.edit_sample_config, mesh)
            edit_tokens, edit_mask, edit_logprobs = edit.tokens, edit.mask, edit.logprobs
            edited = self._decode(edit_tokens, edit_mask)
            timings["time/edit_generate"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            judged_edits = [dict(persona=ex["persona"], question=ex["question"], response=r, reference=ex.get("reference"))
                            for ex, r in zip(examples, edited)]
            scored_edits = score_across_hosts(self.scorer.score, judged_edits)
            require_answers(scored_edits, "GRM on the edits")
            has_critique = np.array([bool(c.strip()) for c in orig.critiques])
            edit_valid = scored_edits.valid & has_critique
            edit_rewards = scored_edits.scores["reward"]
            timings["time/edit_judge"] = time.perf_counter() - t0
            keep_edit = np.asarray(
                select_edits(
                    strategy,
                    rewards_orig=np.nan_to_num(orig.scores["reward"]).astype(np.float32),
                    rewards_edit=np.nan_to_num(edit_rewards).astype(np.float32),
                    question_ids=np.asarray([ex["question_id"] for ex in examples], np.int32),
                    ratio=float(cfg.edit.ratio),
                    key=stream_key(step_key, "edit_selection"),
                    valid_orig=orig.valid,
                    valid_edit=edit_valid,
                )
            )
            metrics.update(host_floats(score_metrics("edit", scored_edits.scores, edit_valid, edit_mask)))
            metrics.update(host_floats(edit_selection_metrics(keep_edit, edit_valid, edit_rewards)))

        metrics.update(host_floats(score_metrics("orig", orig.scores, orig.valid, result.mask)))
        metrics["grm/failure_rate"] = orig.num_invalid / max(len(orig), 1)  # parse failures only
        metrics["grm/row_errors"] = len(orig) - int(orig.answered.sum())  # refused by the server, masked
        metrics["orig/stopped_frac"] = float(result.stopped.mean())
        metrics.update(timings)
        arrays = dict(
            prompt_tokens=prompt_tokens,
            prompt_mask=prompt_mask,
            orig_tokens=result.tokens,
            orig_mask=result.mask,
            orig_sampler_logprobs=result.logprobs,
            orig_rewards=np.nan_to_num(orig.scores["reward"]).astype(np.float32),
            orig_valid=orig.valid,
            edit_prompt_tokens=edit_prompt_tokens,
            edit_prompt_mask=edit_prompt_mask,
            edit_tokens=edit_tokens,
            edit_mask=edit_mask,
            edit_sampler_logprobs=edit_logprobs,
            edit_rewards=np.nan_to_num(edit_rewards).astype(np.float32),
            keep_edit=keep_edit,
        )
        return RolloutBatch(arrays=arrays, metrics=metrics, responses=tuple(responses), edited=tuple(edited))
