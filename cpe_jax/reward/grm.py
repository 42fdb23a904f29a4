"""The Personalized Generative Reward Model (GRM): read its judgements, combine its scores, score batches.

The GRM writes a critique and then three scores (helpfulness, personalization, naturalness; -5..5):

    <critique> ... </critique>
    <scores>
    Helpfulness: 3
    Personalization: -1
    Natural: 4
    </scores>

Reward = 0.35*H + 0.40*P + 0.25*N. A judgement that cannot be read is *invalid*: its scores are NaN,
the RL batch masks it out and the metrics count it (the released code silently scored it 0, which
rewards whatever made the judge fail).

Any `ChatJudge` (reward/judges.py: HTTP server, Python callable, in-framework model) serves as the
GRM through `GRMScorer`, which judges text and parses it with `parse_grm_output`.
"""

import collections
import dataclasses
import math
import re
import unicodedata
from typing import Optional, Sequence

import numpy as np

from cpe_jax.data.prompts import DIMENSIONS, SCORE_MAX, SCORE_MIN, check_grm_style, grm_messages
from cpe_jax.errors import JudgeUnavailable, UserError
from cpe_jax.reward.judges import ANSWER, NO_ANSWER, ROW_ERROR

DEFAULT_WEIGHTS = {"helpfulness": 0.35, "personalization": 0.40, "naturalness": 0.25}

# Names a judge may write on a score line (compared after lower-casing) -> dimension key.
_DIMENSION_NAMES = {
    "helpfulness": "helpfulness",
    "personalization": "personalization",
    "personalisation": "personalization",
    "natural": "naturalness",
    "naturalness": "naturalness",
}
_SCORE_LINE = re.compile(r"(?P<name>[a-z]+)\s*:\s*(?P<value>[+-]?\d+(?:\.\d+)?)\s*分?")
_CRITIQUE_OPEN = re.compile(r"<critique>", re.IGNORECASE)
_CRITIQUE_CLOSE = re.compile(r"</critique>", re.IGNORECASE)
_SCORES_OPEN = re.compile(r"<scores>", re.IGNORECASE)
_SCORES_CLOSE = re.compile(r"</scores>", re.IGNORECASE)


@dataclasses.dataclass
class GRMJudgement:
    """One parsed GRM output.

    `scores` has one float per dimension, NaN where missing, ambiguous or outside -5..5; `critique`
    is the text of the last closed critique block ("" when there is none); `valid` is True only when
    all three scores are there; `problem` says why not (for logs and metrics).
    """

    scores: dict
    critique: str
    valid: bool
    problem: str = ""


def parse_grm_output(text: Optional[str]) -> GRMJudgement:
    """Read a GRM output; never raises, returns an invalid judgement for anything unreadable.

    Rules, chosen so that neither a quoted response nor a truncated generation can yield a score:
    - Scores come only from the LAST `<scores>` block that starts after the last `</critique>`, so a
      fake block the response smuggled in (and the judge quoted in its critique) never wins over the
      judge's own final block. A critique that is opened but never closed means the generation was
      cut off: the whole judgement is invalid.
    - A closed block is read line by line. If the last `<scores>` is never closed (output truncated,
      or the server stopped on `</scores>`), only lines ended by a newline count, so a number cut
      in half ("Natural: 4" of "Natural: 4.5") is never read; the judgement is valid only if all
      three dimensions are on such complete lines.
    - A score line is `Name: value`, with `Name` one of Helpfulness, Personalization (or
      Personalisation), Natural or Naturalness in any letter case; an ASCII or full-width colon;
      an optional `+`/`-` sign (full-width and Unicode minus accepted); an integer or a decimal
      (`3`, `-2`, `+4.5`); an optional trailing 分; surrounding whitespace. Other lines are ignored.
    - A dimension given twice in the block, or outside -5..5, is NaN (and the judgement invalid).
    """
    text = text or ""
    critique, scores_start, problem = _last_critique(text)
    if problem:
        return _invalid(critique, problem)
    body, closed = _last_scores_block(text, scores_start)
    if body is None:
        return _invalid(critique, "no <scores> block")
    lines = body.split("\n")
    if not closed:
        lines = lines[:-1]  # the last piece has no newline after it: possibly cut off mid-number
    found = collections.defaultdict(list)
    for line in lines:
        match = _SCORE_LINE.fullmatch(_normalise(line))
        if match and match["name"] in _DIMENSION_NAMES:
            found[_DIMENSION_NAMES[match["name"]]].append(float(match["value"]))
    scores, problems = {}, []
    for dim in DIMENSIONS:
        values = found.get(dim, [])
        if len(values) != 1:
            scores[dim] = math.nan
            problems.append(f"{dim} {'missing' if not values else 'given twice'}")
        elif not SCORE_MIN <= values[0] <= SCORE_MAX:
            scores[dim] = math.nan
            problems.append(f"{dim} out of range")
        else:
            scores[dim] = values[0]
    if problems and not closed:
        problems.append("<scores> block not closed")
    return GRMJudgement(scores=scores, critique=critique, valid=not problems, problem="; ".join(problems))


def _normalise(line):
    """Full-width colon/digits/signs -> ASCII (NFKC), Unicode minus -> '-', lower case, stripped."""
    return unicodedata.normalize("NFKC", line).replace("\u2212", "-").strip().lower()


def _last_critique(text):
    """(critique, offset where the scores may start, problem) from the last closed critique block."""
    closes = list(_CRITIQUE_CLOSE.finditer(text))
    opens = list(_CRITIQUE_OPEN.finditer(text))
    if opens and (not closes or opens[-1].start() > closes[-1].start()):
        return "", 0, "critique not closed (truncated output)"
    if not closes:
        return "", 0, ""
    close = closes[-1]
    opens_before = [m for m in opens if m.end() <= close.start()]
    critique = text[opens_before[-1].end() : close.start()].strip() if opens_before else ""
    return critique, close.end(), ""


def _last_scores_block(text, start):
    """(body of the last <scores> block after `start`, closed?) or (None, False) when there is none."""
    opens = list(_SCORES_OPEN.finditer(text, start))
    if not opens:
        return None, False
    body_start = opens[-1].end()
    close = _SCORES_CLOSE.search(text, body_start)
    if close is None:
        return text[body_start:], False
    return text[body_start : close.start()], True


def _invalid(critique, problem):
    scores = {dim: math.nan for dim in DIMENSIONS}
    return GRMJudgement(scores=scores, critique=critique, valid=False, problem=problem)


def check_weights(weights):
    """Return `weights` as a dict of floats over exactly the three dimensions (UserError otherwise)."""
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    if set(weights) != set(DIMENSIONS):
        raise UserError(f"GRM weights must have exactly the keys {list(DIMENSIONS)}, got {sorted(weights)}")
    checked = {dim: float(weights[dim]) for dim in DIMENSIONS}
    bad = [dim for dim, w in checked.items() if not math.isfinite(w)]
    if bad:
        raise UserError(f"GRM weight for {bad[0]} must be a finite number, got {weights[bad[0]]!r}")
    return checked


def combine_scores(scores, weights=None):
    """Weighted sum of the three dimensions (0.35 H + 0.40 P + 0.25 N by default).

    `scores` maps each dimension to a float or to an array (NumPy or JAX, any matching shape; the
    sum is elementwise and jittable). NaN in any dimension gives NaN, so an invalid judgement can
    never turn into a number. Weights are used as given, not renormalised.
    """
    weights = check_weights(weights)
    missing = [dim for dim in DIMENSIONS if dim not in scores]
    if missing:
        raise KeyError(f"combine_scores: scores have no {missing[0]!r} (keys: {sorted(scores)})")
    total = weights[DIMENSIONS[0]] * scores[DIMENSIONS[0]]
    for dim in DIMENSIONS[1:]:
        total = total + weights[dim] * scores[dim]
    return total


@dataclasses.dataclass
class GRMBatchResult:
    """GRM judgements of a batch; unpacks as `scores, critiques = result`.

    `scores` maps each dimension and `"reward"` (the combined score) to a float64 array with NaN on
    invalid rows; `valid` is the boolean mask of rows with three readable scores; `problems[i]` says
    why row i is invalid ("" when valid); `critiques[i]` is "" when the judge wrote none.
    `outcomes[i]` is the judge call's outcome (`reward.judges`: ANSWER, ROW_ERROR, NO_ANSWER); a
    row without an answer is invalid too, but it is no judgement: callers must not treat it as data
    (`unanswered` lists them; `num_invalid` and the metrics count answered rows only).
    """

    scores: dict
    critiques: list
    valid: np.ndarray
    problems: list
    outcomes: list = None

    def __post_init__(self):
        if self.outcomes is None:
            self.outcomes = [ANSWER] * len(self.critiques)

    @property
    def answered(self) -> np.ndarray:
        return np.array([o == ANSWER for o in self.outcomes], dtype=bool)

    @property
    def unanswered(self) -> list:
        """Indices of rows whose judge call got no answer (NO_ANSWER)."""
        return [i for i, o in enumerate(self.outcomes) if o == NO_ANSWER]

    def __iter__(self):
        yield self.scores
        yield self.critiques

    def __len__(self):
        return len(self.critiques)

    @property
    def num_invalid(self) -> int:
        """Answered rows whose judgement cannot be read (parse failures only)."""
        return int(np.sum(~self.valid & self.answered))

    def metrics(self, prefix="grm") -> dict:
        """Counts and means over valid rows, for metrics.jsonl (means are NaN if no row is valid)."""
        out = {f"{prefix}/invalid": self.num_invalid, f"{prefix}/invalid_frac": self.num_invalid / max(len(self), 1)}
        for name, values in self.scores.items():
            out[f"{prefix}/{name}"] = float(np.mean(values[self.valid])) if self.valid.any() else math.nan
        return out


def judgements_to_batch(judgements: Sequence[GRMJudgement], weights=None, outcomes=None) -> GRMBatchResult:
    """Stack per-row judgements into arrays and add the combined `reward`."""
    scores = {dim: np.array([j.scores[dim] for j in judgements], dtype=np.float64) for dim in DIMENSIONS}
    scores["reward"] = combine_scores(scores, weights)
    return GRMBatchResult(
        scores=scores,
        critiques=[j.critique for j in judgements],
        valid=np.array([j.valid for j in judgements], dtype=bool),
        problems=[j.problem for j in judgements],
        outcomes=list(outcomes) if outcomes is not None else None,
    )


def reply_judgement(reply) -> GRMJudgement:
    """The GRM judgement of one JudgeReply: parsed from an answer, invalid (with the server's
    message or why there was no answer as `problem`) otherwise."""
    if reply.outcome == ANSWER:
        return parse_grm_output(reply.text)
    what = "row error" if reply.outcome == ROW_ERROR else "no answer"
    return _invalid("", f"{what}: {reply.error}")


def score_across_hosts(score, rows) -> GRMBatchResult:
    """`score(rows)` with the judge calls spread over the hosts of a multi-host job in which every
    host holds the same rows: each host judges its own share (`sharding.spread_over_hosts`) and
    every host gets every row's judgement back, in row order (edit selection needs all of them,
    and every host must select the same rows)."""
    import jax

    from cpe_jax.sharding import spread_over_hosts

    if jax.process_count() == 1 or not rows:
        return score(rows)

    def work(share):
        own = score(share)
        return [{"scores": {k: float(v[i]) for k, v in own.scores.items()}, "critique": own.critiques[i],
                 "valid": bool(own.valid[i]), "problem": own.problems[i], "outcome": own.outcomes[i]}
                for i in range(len(share))]

    judged = spread_over_hosts(work, rows)
    return GRMBatchResult(
        scores={k: np.asarray([r["scores"][k] for r in judged], np.float64) for k in judged[0]["scores"]},
        critiques=[r["critique"] for r in judged],
        valid=np.asarray([r["valid"] for r in judged], bool),
        problems=[r["problem"] for r in judged],
        outcomes=[r["outcome"] for r in judged])


class AcrossHostsScorer:
    """A scorer (`score(examples) -> GRMBatchResult`) for a multi-host job in which every host
    passes the same examples: each host scores its share (`score_across_hosts`)."""

    def __init__(self, scorer):
        self.scorer = scorer

    def score(self, examples) -> GRMBatchResult:
        return score_across_hosts(self.scorer.score, examples)


def require_answers(result: GRMBatchResult, what="GRM"):
    """Raise JudgeUnavailable when a row of `result` got no answer (an RL step is not trained on
    half-judged rows: a NaN-masked row would teach nothing and hide the outage)."""
    missing = result.unanswered
    if missing:
        raise JudgeUnavailable(f"{what}: {len(missing)} of {len(result)} judge calls got no answer "
                               f"(first: {result.problems[missing[0]]})", done=0, remaining=0)


class GRMScorer:
    """Scores (persona, question, response) examples with any ChatJudge acting as the GRM.

    As in the paper, the reward is judged at `temperature` (0: greedy) while the critique that drives
    editing is sampled at `critique_temperature` (0.9): `score` gives the former, `critique` the
    latter, and `score_for_editing` both in one result (one judge call when the temperatures agree).
    """

    def __init__(
        self,
        judge,
        *,
        language="en",
        temperature=0.0,
        critique_temperature=0.9,
        weights=None,
        max_tokens=1024,
        prompt_style="full",
    ):
        self.judge = judge
        self.language = language
        self.prompt_style = check_grm_style(prompt_style)
        self.temperature = float(temperature)
        self.critique_temperature = float(critique_temperature)
        self.weights = check_weights(weights)
        self.max_tokens = int(max_tokens)

    def score(self, examples) -> GRMBatchResult:
        """Judge every example at `temperature`; invalid rows are NaN in `scores` and False in `valid`."""
        return self._judge(examples, self.temperature)

    def critique(self, examples) -> GRMBatchResult:
        """Judge every example at `critique_temperature`: sampled critiques for the post-edit prompt."""
        return self._judge(examples, self.critique_temperature)

    def score_for_editing(self, examples) -> GRMBatchResult:
        """Scores (and `valid`) judged at `temperature`, critiques sampled at `critique_temperature`."""
        scored = self.score(examples)
        if self.critique_temperature == self.temperature:
            return scored
        critiqued = self.critique(examples)
        outcomes = [a if a != ANSWER else b for a, b in zip(scored.outcomes, critiqued.outcomes)]
        return dataclasses.replace(scored, critiques=critiqued.critiques, outcomes=outcomes)

    def _judge(self, examples, temperature) -> GRMBatchResult:
        examples = list(examples)
        conversations = [self._messages(i, example) for i, example in enumerate(examples)]
        replies = self.judge(conversations, temperature=temperature, max_tokens=self.max_tokens) if conversations else []
        if len(replies) != len(conversations):
            raise RuntimeError(f"judge returned {len(replies)} replies for {len(conversations)} conversations")
        return judgements_to_batch([reply_judgement(reply) for reply in replies], self.weights,
                                   outcomes=[reply.outcome for reply in replies])

    def _messages(self, index, example):
        fields = example_fields(example, index)
        return grm_messages(*fields, language=self.language, style=self.prompt_style)


def example_fields(example, index):
    """(persona, question, response) of a GRM example: dict keys or attributes; a UserError naming
    the row when one is absent."""

    def field(name):
        if isinstance(example, dict):
            if name in example:
                return example[name]
        elif hasattr(example, name):
            return getattr(example, name)
        raise UserError(f"GRM example {index} has no field {name!r} (needs persona, question, response)")

    return tuple(field(name) for name in ("persona", "question", "response"))


# The in-framework Flax GRM (a Qwen2 checkpoint judged through the sampler) and its "expected score"
# mode (after the critique, force each `Dimension:` prefix and take the probability-weighted mean
# over the score tokens -5..5, inside the jitted step) belong in this module, below this line.
