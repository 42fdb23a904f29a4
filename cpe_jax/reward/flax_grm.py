"""The in-framework GRM: any Qwen2 checkpoint judging through the sampler, and its expected-score mode.

Two ways to use a Flax model as the GRM:

- `FlaxGRMJudge(model, tokenizer)` is a `ChatJudge` (like `HTTPJudge`): it writes the whole
  judgement as text, so `GRMScorer(FlaxGRMJudge(...))` parses it like any other judge's output (and
  the pairwise evaluation can use it as its judge).
- Expected-score mode (`FlaxGRMScorer`, or the pure `expected_scores` inside a jitted step): the
  model writes only the critique; then each score line is forced, `Helpfulness:` and so on, and
  the score is the probability-weighted mean over the 11 values -5..5. Scores cannot fail to
  parse and are smooth in the model's beliefs.

Scoring a dimension: the label's tokens are teacher-forced after the prefix, then every candidate
value " -5" .. " 5" is scored by teacher forcing (its log-prob is the sum of its tokens'
log-probs; a value may be several tokens), all 11 in one batched forward pass over a copy of the
KV cache (the cache is replicated 11 times for that pass: mind the memory on long prefixes). The
11 log-probs are renormalised by a softmax and averaged against -5..5. The next dimension's line
continues from the ARGMAX value (what a greedy judge would have written), so the three lines read
like a real judgement: `Helpfulness: 3\\nPersonalization: -1\\nNatural: 4`.

The score text is tokenized piecewise (label, value, newline + next label), which matches the
whole-line tokenization of Qwen's pre-tokenizer (digits are split off, " -" is one piece).
"""

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpe_jax.data.padding import left_pad
from cpe_jax.data.prompts import DIMENSIONS, SCORE_LABELS, SCORE_MAX, SCORE_MIN, check_grm_style, grm_messages
from cpe_jax.errors import UserError
from cpe_jax.reward.grm import GRMBatchResult, check_weights, combine_scores, example_fields
from cpe_jax.reward.judges import JudgeReply

SCORE_VALUES = tuple(range(SCORE_MIN, SCORE_MAX + 1))
# What the model has written when the forced score lines begin.
SCORES_OPENING = "</critique>\n<scores>\n"
_LOGPROB_CANDIDATES = 5
_CRITIQUE_CLOSE = re.compile(r"</critique>", re.IGNORECASE)
_CRITIQUE_OPEN = re.compile(r"<critique>", re.IGNORECASE)


# ---- the jittable core -----------------------------------------------------------------------


class ScoreTokenTables(NamedTuple):
    """Token ids of the forced score lines (a pytree of small static-shaped arrays).

    values [K]: the score of each candidate (-5..5); candidate_tokens [K, C] with candidate_mask:
    each value's tokens, right-padded; label_tokens [D, L] with label_mask: each dimension's forced
    text ("Helpfulness:", "\\nPersonalization:", "\\nNatural:"), left-padded.
    """

    values: jax.Array
    candidate_tokens: jax.Array
    candidate_mask: jax.Array
    label_tokens: jax.Array
    label_mask: jax.Array


def _encode(tokenizer, text):
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise UserError(f"the GRM tokenizer encodes {text!r} to no tokens")
    return ids


def build_score_tables(tokenizer, language="en", vocab_size=None) -> ScoreTokenTables:
    """The forced score-line tokens of `tokenizer` (labels are the same in English and Chinese);
    with `vocab_size`, each must be a token of the GRM model."""
    from cpe_jax.data.prompts import LANGUAGES
    from cpe_jax.tokenizer import check_token_ids

    if language not in LANGUAGES:
        raise UserError(f"language must be one of {LANGUAGES}, got {language!r}")
    candidates = [_encode(tokenizer, f" {v}") for v in SCORE_VALUES]
    labels = [_encode(tokenizer, ("" if d == 0 else "\n") + f"{name}:") for d, name in enumerate(SCORE_LABELS)]
    if vocab_size is not None:
        for ids in candidates + labels:
            check_token_ids(ids, vocab_size, f"the GRM score line {tokenizer.decode(ids)!r}")
    c = max(map(len, candidates))
    l = max(map(len, labels))
    cand_tokens = np.zeros((len(candidates), c), np.int32)
    cand_mask = np.zeros((len(candidates), c), bool)
    for i, ids in enumerate(candidates):
        cand_tokens[i, : len(ids)] = ids
        cand_mask[i, : len(ids)] = True
    label_tokens = np.zeros((len(labels), l), np.int32)
    label_mask = np.zeros((len(labels), l), bool)
    for i, ids in enumerate(labels):
        label_tokens[i, l - len(ids) :] = ids
        label_mask[i, l - len(ids) :] = True
    return ScoreTokenTables(
        values=jnp.asarray(SCORE_VALUES, jnp.float32),
        candidate_tokens=jnp.asarray(cand_tokens),
        candidate_mask=jnp.asarray(cand_mask),
        label_tokens=jnp.asarray(label_tokens),
        label_mask=jnp.asarray(label_mask),
    )


def _token_logprobs(logits, tokens):
    """log softmax(logits)[tokens] without materialising the full log-softmax."""
    chosen = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1)


def _positions(n_valid, mask):
    """Positions of newly fed tokens: continue each row's count of valid tokens."""
    return jnp.maximum(n_valid[:, None] + jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def expected_scores(graphdef, state, prefix_tokens, prefix_mask, tables: ScoreTokenTables) -> dict:
    """Expected GRM scores after left-padded prefixes [B, P]; pure and jittable.

    Each prefix is the GRM prompt, the critique and `SCORES_OPENING`. Returns a dict with one
    float32 [B] array per dimension (`helpfulness`, `personalization`, `naturalness`), `probs`
    [B, 3, 11] (the distribution over -5..5 of each dimension) and `argmax` [B, 3] (the values
    written into the continued prefix).
    """
    from cpe_jax.models.qwen2.model import init_cache, positions_from_mask

    model = nnx.merge(graphdef, state)
    b, p = prefix_tokens.shape
    k, c = tables.candidate_tokens.shape
    d, l = tables.label_tokens.shape
    step = c + l
    total = p + d * step + (c - 1)
    prefix_mask = prefix_mask.astype(bool)
    cache = init_cache(model.config, b, total)
    cache_mask = jnp.zeros((b, total), bool).at[:, :p].set(prefix_mask)
    _, cache = model(prefix_tokens.astype(jnp.int32), positions_from_mask(prefix_mask), cache, cache_mask,
                     skip_logits=True)
    n_valid = jnp.sum(prefix_mask, axis=1).astype(jnp.int32)

    def score_dimension(carry, xs):
        cache, cache_mask, n_valid, chosen_tokens, chosen_mask = carry
        label_tokens, label_mask, start = xs
        # Force the previous line's value (nothing for the first dimension) and this label.
        forced = jnp.concatenate([chosen_tokens, jnp.broadcast_to(label_tokens, (b, l))], axis=1)
        forced_mask = jnp.concatenate([chosen_mask, jnp.broadcast_to(label_mask, (b, l))], axis=1)
        cache_mask = jax.lax.dynamic_update_slice(cache_mask, forced_mask, (0, start))
        _, cache, hidden = model(forced, _positions(n_valid, forced_mask), cache, cache_mask,
                                 return_hidden=True, skip_logits=True)
        n_valid = n_valid + jnp.sum(forced_mask, axis=1).astype(jnp.int32)
        first_logits = model.vocabulary_logits(hidden[:, -1])  # the label always ends the forced block
        candidate_logprobs = _token_logprobs(
            first_logits[:, None, :], jnp.broadcast_to(tables.candidate_tokens[:, 0], (b, k))
        )
        if c > 1:
            candidate_logprobs = candidate_logprobs + _continuation_logprobs(
                model, cache, cache_mask, n_valid, tables, start + step
            )
        probs = jax.nn.softmax(candidate_logprobs, axis=-1)
        best = jnp.argmax(candidate_logprobs, axis=-1)
        carry = (cache, cache_mask, n_valid, tables.candidate_tokens[best], tables.candidate_mask[best])
        return carry, (probs @ tables.values, probs, tables.values[best])

    # One scan step per dimension: the three lines compile to one body.
    carry = (cache, cache_mask, n_valid, jnp.zeros((b, c), jnp.int32), jnp.zeros((b, c), bool))
    starts = p + step * jnp.arange(d, dtype=jnp.int32)
    _, (expectations, probs, best) = jax.lax.scan(
        score_dimension, carry, (tables.label_tokens, tables.label_mask, starts)
    )
    out = {name: expectations[i] for i, name in enumerate(DIMENSIONS)}
    out["probs"] = jnp.transpose(probs, (1, 0, 2))
    out["argmax"] = best.T
    return out


def _continuation_logprobs(model, cache, cache_mask, n_valid, tables, end):
    """[B, K] summed log-probs of every candidate's tokens after its first, in one forward pass
    over the cache replicated once per candidate (rows ordered b * K + k)."""
    from cpe_jax.models.qwen2.model import map_layers

    k, c = tables.candidate_tokens.shape
    b = cache_mask.shape[0]
    fed = jnp.tile(tables.candidate_tokens[:, : c - 1], (b, 1))  # [B*K, C-1]
    fed_mask = jnp.tile(tables.candidate_mask[:, : c - 1], (b, 1))

    def per_candidate(layer):
        return jnp.repeat(layer, k, axis=0)

    branch = {"k": map_layers(per_candidate, cache["k"]), "v": map_layers(per_candidate, cache["v"]),
              "end": cache["end"]}
    branch_mask = jax.lax.dynamic_update_slice(jnp.repeat(cache_mask, k, axis=0), fed_mask, (0, end))
    positions = _positions(jnp.repeat(n_valid, k), fed_mask)
    logits, _ = model(fed, positions, branch, branch_mask)
    targets = jnp.tile(tables.candidate_tokens[:, 1:], (b, 1))
    target_mask = jnp.tile(tables.candidate_mask[:, 1:], (b, 1))
    logprobs = jnp.where(target_mask, _token_logprobs(logits, targets), 0.0)
    return jnp.sum(logprobs, axis=1).reshape(b, k)


# ---- host side -------------------------------------------------------------------------------


def _sampler(model, tokenizer, mesh, max_batch_size):
    from cpe_jax.sampling import Sampler

    return Sampler(model, tokenizer, mesh=mesh, max_batch_size=max_batch_size)


class FlaxGRMJudge:
    """ChatJudge backed by a Flax Qwen2 model: chats go through the tokenizer's chat template and
    the sampler. `max_tokens` caps every request (it bounds the compiled decode length).

    Each call samples with a fresh seed (`seed`, `seed + 1`, ...), so repeated judging at a
    temperature above 0 gives independent samples, and the run is reproducible from `seed`.
    With `want_logprobs`, `first_token_logprobs` holds the top-5 first tokens of the reply under
    the model (one extra forward pass over the prompts).
    """

    def __init__(self, model, tokenizer, *, mesh=None, max_tokens=512, max_batch_size=16, seed=0):
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        self.sampler = _sampler(model, tokenizer, mesh, max_batch_size)
        self.seed = int(seed)
        self._calls = 0
        self._first_token_top = None

    def __repr__(self):
        return f"FlaxGRMJudge(max_tokens={self.max_tokens})"

    def encode(self, conversation):
        from cpe_jax.tokenizer import apply_chat_template

        return apply_chat_template(self.tokenizer, conversation, add_generation_prompt=True)

    def __call__(self, conversations, *, temperature=0.0, max_tokens=1024, want_logprobs=False):
        from cpe_jax.sampling import SamplingParams

        conversations = list(conversations)
        if not conversations:
            return []
        prompts = [self.encode(c) for c in conversations]
        params = SamplingParams(max_tokens=min(int(max_tokens), self.max_tokens), temperature=float(temperature),
                                seed=self.seed + self._calls)
        self._calls += 1
        outputs = self.sampler.generate(prompts, params)
        tops = self._first_tokens(prompts) if want_logprobs else [None] * len(prompts)
        return [JudgeReply(text=out.text or "", first_token_logprobs=top) for out, top in zip(outputs, tops)]

    def _first_tokens(self, prompts):
        """{token text: log-prob} of the 5 likeliest first reply tokens of every prompt."""
        from cpe_jax.models.qwen2.model import positions_from_mask
        from cpe_jax.engine import bucket_size

        graphdef = self.sampler.graphdef
        if self._first_token_top is None:

            def top(state, tokens, mask):
                model = nnx.merge(graphdef, state)
                _, _, hidden = model(tokens, positions_from_mask(mask), None, mask, return_hidden=True,
                                     skip_logits=True)
                logprobs = jax.nn.log_softmax(model.vocabulary_logits(hidden[:, -1]), axis=-1)
                return jax.lax.top_k(logprobs, _LOGPROB_CANDIDATES)

            self._first_token_top = jax.jit(top)
        tokens, mask, _ = left_pad(prompts, bucket_size(max(map(len, prompts)), 16), self.sampler.pad_token_id)
        values, ids = jax.device_get(self._first_token_top(self.sampler.state, tokens, mask))
        return [
            {self.tokenizer.decode([int(t)]): float(v) for t, v in zip(row_ids, row_values)}
            for row_ids, row_values in zip(ids, values)
        ]


def critique_prefix(generated_text):
    """(assistant text up to the forced score lines, critique) from what the model wrote.

    The text is cut at the first `</critique>`; a critique never closed (cut off by max_tokens) is
    kept as far as it goes. A missing `<critique>` opening is added, so the forced lines always
    follow the layout the GRM was trained on.
    """
    text = generated_text or ""
    close = _CRITIQUE_CLOSE.search(text)
    body = text[: close.start()] if close else text
    opening = _CRITIQUE_OPEN.search(body)
    if opening:
        critique = body[opening.end() :]
        head = body[: opening.end()]
    else:
        critique, head = body, "<critique>\n"
    critique = critique.strip()
    return f"{head.rstrip()}\n{critique}\n{SCORES_OPENING}" if critique else f"{head.rstrip()}\n{SCORES_OPENING}", critique


class FlaxGRMScorer:
    """GRM scorer in expected-score mode: `score(examples) -> GRMBatchResult` (always valid rows).

    The critique is sampled at `temperature` (0: greedy), then the scores are the expectations of
    `expected_scores`. `critique` and `score_for_editing` mirror `GRMScorer`: the critique used for
    editing is sampled at `critique_temperature`.
    """

    def __init__(self, model, tokenizer, *, language="en", temperature=0.0, critique_temperature=0.9,
                 weights=None, max_tokens=512, mesh=None, max_batch_size=16, seed=0, prompt_style="full"):
        self.tokenizer = tokenizer
        self.language = language
        self.prompt_style = check_grm_style(prompt_style)
        self.temperature = float(temperature)
        self.critique_temperature = float(critique_temperature)
        self.weights = check_weights(weights)
        self.max_tokens = int(max_tokens)
        self.max_batch_size = int(max_batch_size)
        self.mesh = mesh
        self.judge = FlaxGRMJudge(model, tokenizer, mesh=mesh, max_tokens=max_tokens,
                                  max_batch_size=max_batch_size, seed=seed)
        self.tables = build_score_tables(tokenizer, language, model.config.vocab_size)
        graphdef = self.judge.sampler.graphdef
        self._expected = jax.jit(lambda state, tokens, mask, tables: expected_scores(graphdef, state, tokens, mask,
                                                                                      tables))

    def score(self, examples) -> GRMBatchResult:
        return self._score(examples, self.temperature)

    def critique(self, examples) -> GRMBatchResult:
        return self._score(examples, self.critique_temperature)

    def score_for_editing(self, examples) -> GRMBatchResult:
        scored = self.score(examples)
        if self.critique_temperature == self.temperature:
            return scored
        return dataclasses.replace(scored, critiques=self.critique(examples).critiques)

    def _score(self, examples, temperature) -> GRMBatchResult:
        from cpe_jax.engine import bucket_size

        examples = list(examples)
        conversations = [
            grm_messages(*example_fields(e, i), language=self.language, style=self.prompt_style)
            for i, e in enumerate(examples)
        ]
        replies = self.judge(conversations, temperature=temperature, max_tokens=self.max_tokens)
        prefixes, critiques = [], []
        for conversation, reply in zip(conversations, replies):
            text, critique = critique_prefix(reply.text)
            prefixes.append(self.judge.encode(conversation) + list(self.tokenizer.encode(text, add_special_tokens=False)))
            critiques.append(critique)
        per_dim = {dim: [] for dim in DIMENSIONS}
        for start in range(0, len(prefixes), self.max_batch_size):
            chunk = prefixes[start : start + self.max_batch_size]
            rows = bucket_size(len(chunk))
            tokens, mask, _ = left_pad(chunk + [[]] * (rows - len(chunk)), bucket_size(max(map(len, chunk)), 16),
                                       self.judge.sampler.pad_token_id)
            out = jax.device_get(self._expected(self.judge.sampler.state, tokens, mask, self.tables))
            for dim in DIMENSIONS:
                per_dim[dim].append(np.asarray(out[dim][: len(chunk)], np.float64))
        scores = {dim: np.concatenate(v) if v else np.zeros((0,)) for dim, v in per_dim.items()}
        scores["reward"] = combine_scores(scores, self.weights)
        return GRMBatchResult(scores=scores, critiques=critiques, valid=np.ones(len(examples), bool),
                              problems=[""] * len(examples))


__all__ = [
    "FlaxGRMJudge",
    "FlaxGRMScorer",
    "ScoreTokenTables",
    "build_score_tables",
    "critique_prefix",
    "expected_scores",
    "SCORES_OPENING",
    "SCORE_VALUES",
]
