"""Pairwise win rates against a baseline, raw and length-controlled (AlpacaEval's GLM).

Length control follows AlpacaEval 2.0 with its minimal formula
`tanh(std_delta_len) + not_gamed_baseline - 1`: a logistic model without intercept on two
features, the tanh of the length difference divided by its standard deviation and a constant
"model" column. Soft labels enter as two copies of every row, labelled 1 with weight p and 0 with
weight 1 - p. The L1 strength comes from 5-fold group cross-validation on the soft log-loss, the
model is refit on all rows, and the length-controlled win rate is its prediction at zero length
difference, i.e. sigmoid(model weight).
"""

import dataclasses
import inspect
import math
import re
import warnings

import numpy as np

from cpe_jax.data.prompts import pairwise_judge_messages
from cpe_jax.errors import UserError
from cpe_jax.reward.judges import ANSWER, NO_ANSWER, ROW_ERROR

# Below this many rows (or distinct CV groups) the 5-fold GLM is meaningless: raw rate only.
MIN_ROWS_FOR_LC = 10
N_FOLDS = 5
# LogisticRegressionCV's default grid of inverse L1 strengths, as AlpacaEval uses it.
C_GRID = np.logspace(-4, 4, 10)


# ----------------------------------------------------------------------------------------------
# Metrics


def _validated(preferences, model_lengths, baseline_lengths):
    arrays = {}
    for name, values in (
        ("preferences", preferences),
        ("model_lengths", model_lengths),
        ("baseline_lengths", baseline_lengths),
    ):
        try:
            array = np.asarray(values, dtype=float)
        except (TypeError, ValueError) as e:
            raise UserError(f"{name} must be numbers: {e}") from None
        if array.ndim != 1:
            raise UserError(f"{name} must be one-dimensional, got shape {array.shape}")
        bad = np.flatnonzero(~np.isfinite(array))
        if bad.size:
            raise UserError(f"{name}[{bad[0]}] is {array[bad[0]]}, expected a finite number")
        arrays[name] = array
    p, model_len, base_len = arrays.values()
    if not len(p) == len(model_len) == len(base_len):
        raise UserError(
            f"preferences, model_lengths and baseline_lengths differ in length: "
            f"{len(p)}, {len(model_len)}, {len(base_len)}"
        )
    if len(p) == 0:
        raise UserError("no preferences to compute a win rate from")
    outside = np.flatnonzero((p < 0) | (p > 1))
    if outside.size:
        raise UserError(f"preferences[{outside[0]}] = {p[outside[0]]} is outside [0, 1]")
    for name, lengths in (("model_lengths", model_len), ("baseline_lengths", base_len)):
        negative = np.flatnonzero(lengths < 0)
        if negative.size:
            raise UserError(f"{name}[{negative[0]}] = {lengths[negative[0]]} is negative")
    return p, model_len, base_len


def _raw_metrics(p, model_len, base_len):
    n = len(p)
    return {
        "n": int(n),
        "win_rate": float(p.mean() * 100),
        "standard_error": float(p.std(ddof=1) / math.sqrt(n) * 100) if n > 1 else None,
        "n_wins": int((p > 0.5).sum()),
        "n_losses": int((p < 0.5).sum()),
        "n_draws": int((p == 0.5).sum()),
        "mean_model_length": float(model_len.mean()),
        "mean_baseline_length": float(base_len.mean()),
    }


def raw_win_rate(preferences, model_lengths, baseline_lengths):
    """The plain win rate (percent) with its standard error and mean lengths; no length control."""
    return _raw_metrics(*_validated(preferences, model_lengths, baseline_lengths))


def _l1_logistic(C):
    """An L1 logistic regression without intercept (liblinear), across scikit-learn versions."""
    from sklearn.linear_model import LogisticRegression

    # scikit-learn 1.8 deprecated `penalty` in favour of `l1_ratio`.
    penalty_default = inspect.signature(LogisticRegression).parameters["penalty"].default
    l1 = {"l1_ratio": 1.0} if penalty_default == "deprecated" else {"penalty": "l1"}
    return LogisticRegression(C=C, solver="liblinear", fit_intercept=False, random_state=123, **l1)


def _fit_soft(features, p, C):
    """Fit on soft labels: each row twice, as label 1 with weight p and label 0 with weight 1-p."""
    X = np.concatenate([features, features])
    y = np.concatenate([np.ones(len(p)), np.zeros(len(p))])
    weight = np.concatenate([p, 1 - p])
    model = _l1_logistic(C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # liblinear convergence notes on separable folds
        model.fit(X, y, sample_weight=weight)
    return model.coef_[0]


def _soft_log_loss(features, p, coef):
    q = np.clip(1 / (1 + np.exp(-features @ coef)), 1e-15, 1 - 1e-15)
    return -np.mean(p * np.log(q) + (1 - p) * np.log(1 - q))


def _select_C(features, p, groups):
    """The C of the grid with the best mean held-out soft log-loss over 5 group folds."""
    from sklearn.model_selection import GroupKFold

    folds = list(GroupKFold(n_splits=N_FOLDS).split(features, groups=groups))
    mean_loss = [
        np.mean(
            [
                _soft_log_loss(features[test], p[test], _fit_soft(features[train], p[train], C))
                for train, test in folds
            ]
        )
        for C in C_GRID
    ]
    return C_GRID[int(np.argmin(mean_loss))]  # ties go to the strongest regularization


def _sandwich_standard_error(features, p, coef):
    """Delta-method standard error of sigmoid(model weight), with a robust (sandwich) covariance.

    AlpacaEval reports the standard error of the per-row GLM predictions, which is exactly zero
    under the minimal formula (every row predicts the same value), so it is no use as an error bar.
    With equal lengths this reduces to the standard error of the mean preference.
    """
    n = len(p)
    active = np.flatnonzero(np.any(features != 0, axis=0))
    X = features[:, active]
    q = 1 / (1 + np.exp(-features @ coef))
    bread = np.linalg.pinv((X * (q * (1 - q))[:, None]).T @ X)
    scores = X * (p - q)[:, None]
    covariance = bread @ (scores.T @ scores) @ bread * n / (n - 1)
    model_column = int(np.flatnonzero(active == 1)[0])
    q0 = 1 / (1 + math.exp(-coef[1]))
    return q0 * (1 - q0) * math.sqrt(max(covariance[model_column, model_column], 0.0))


def lc_win_rate(preferences, model_lengths, baseline_lengths, *, groups=None):
    """Raw and length-controlled win rates (percent) of a model against a baseline.

    `preferences[i]` is P(model beats baseline) in [0, 1]; lengths are in characters. `groups`
    (optional, one hashable per row) keeps rows of one group in the same CV fold, e.g. several
    samples of one question; by default every row is its own group, as in AlpacaEval.
    Returns `n`, `win_rate`, `standard_error`, `lc_win_rate`, `lc_standard_error`,
    `length_coefficient` (> 0: the judge favours the longer response), the chosen
    `regularization_C`, win/loss/draw counts and mean lengths. `lc_standard_error` is a
    delta-method error bar (see `_sandwich_standard_error`), not AlpacaEval's, which is always 0
    under this formula. On small or noisy samples cross-validation may zero every weight, which
    gives exactly 50, as AlpacaEval does.
    """
    p, model_len, base_len = _validated(preferences, model_lengths, baseline_lengths)
    n = len(p)
    if groups is None:
        group_ids = np.arange(n)
    else:
        groups = list(groups)
        if len(groups) != n:
            raise UserError(f"groups has {len(groups)} entries for {n} preferences")
        group_ids = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
    n_groups = len(np.unique(group_ids))
    if n < MIN_ROWS_FOR_LC or n_groups < N_FOLDS:
        raise UserError(
            f"length-controlled win rate needs at least {MIN_ROWS_FOR_LC} rows in at least "
            f"{N_FOLDS} groups, got {n} rows in {n_groups} groups"
        )
    metrics = _raw_metrics(p, model_len, base_len)

    delta = model_len - base_len
    spread = delta.std(ddof=1)
    # A constant length difference carries no information apart from the model term.
    std_delta = delta / spread if spread > 0 else np.zeros(n)
    features = np.stack([np.tanh(std_delta), np.ones(n)], axis=1)

    C = _select_C(features, p, group_ids)
    coef = _fit_soft(features, p, C)
    metrics["lc_win_rate"] = float(100 / (1 + math.exp(-coef[1])))  # prediction at zero length delta
    metrics["lc_standard_error"] = float(100 * _sandwich_standard_error(features, p, coef))
    metrics["length_coefficient"] = float(coef[0])
    metrics["regularization_C"] = float(C)
    return metrics


# ----------------------------------------------------------------------------------------------
# Pairwise judging


def pairwise_prompt(persona, question, response_a, response_b, language="en"):
    """The judge conversation for one presentation order (template in data/prompts.py)."""
    return pairwise_judge_messages(persona, question, response_a, response_b, language=language)


# The verdict is the first token: "A" or "B", possibly wrapped in markdown, brackets or quotes,
# or introduced as "Response B" / "回答B". "As a judge ..." or a lowercase "a" is not a verdict.
_VERDICT = re.compile(r"^[\s*_`'\"(\[【「#>]*(?:(?i:response|answer)\s*|回答\s*|回复\s*)?([AB])(?![A-Za-z])")


def parse_verdict(text):
    """'A', 'B' or None from the start of a judge reply."""
    match = _VERDICT.match(text or "")
    return match.group(1) if match else None


def _logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def prob_first_from_logprobs(first_token_logprobs):
    """P(A) from first-token log-probs: two-way softmax over the "A" and "B" tokens, or None.

    Token variants (" A", "A") are pooled. A letter missing from the reported top tokens counts
    as probability zero; with neither letter present there is no soft preference.
    """
    if not first_token_logprobs:
        return None
    pooled = {"A": [], "B": []}
    for token, logprob in first_token_logprobs.items():
        key = str(token).strip().upper()
        if key in pooled and logprob is not None and math.isfinite(logprob):
            pooled[key].append(float(logprob))
    if not pooled["A"] and not pooled["B"]:
        return None
    if not pooled["B"]:
        return 1.0
    if not pooled["A"]:
        return 0.0
    log_a, log_b = _logsumexp(pooled["A"]), _logsumexp(pooled["B"])
    return 1 / (1 + math.exp(log_b - log_a))


def _prob_first(reply):
    """(P(response A is better), parsed?) from one JudgeReply."""
    soft = prob_first_from_logprobs(reply.first_token_logprobs)
    if soft is not None:
        return soft, True
    verdict = parse_verdict(reply.text)
    if verdict is None:
        return 0.5, False
    return (1.0 if verdict == "A" else 0.0), True


@dataclasses.dataclass
class PairwiseJudgement:
    """What `judge_pairs` returns.

    `preferences[i]`: P(model beats baseline) for example i, averaged over the judged orders.
    `model_first[i]` / `model_second[i]`: the preference from each order alone (`model_second`
    is None when only one order was judged). `replies`: the judge's texts, model-first then
    model-second per example. `n_unparseable`: answered replies with neither log-probs nor a
    leading A/B, each counted as 0.5. `outcomes[i]`: ANSWER when every call of example i was
    answered, else ROW_ERROR or NO_ANSWER (`reward.judges`); such an example's preferences are NaN,
    never a 0.5 draw, so a win rate over it fails loudly instead of drifting to 50%.
    """

    preferences: list
    model_first: list
    model_second: list = None
    replies: list = dataclasses.field(default_factory=list)
    n_unparseable: int = 0
    outcomes: list = None


_EXAMPLE_KEYS = ("persona", "question", "model_response", "baseline_response")


def judge_pairs(judge, examples, *, both_orders=True, language="en", max_tokens=32, batch_size=64):
    """Judge model vs baseline responses with a ChatJudge; see PairwiseJudgement for the result.

    Each example is a dict with `persona`, `question`, `model_response` and `baseline_response`.
    With `both_orders`, every pair is shown model-first and model-second and the two preferences
    are averaged, which cancels the judge's position bias. The judge is called with at most
    `batch_size` conversations at a time (HTTP backends send one batch concurrently).
    """
    examples = list(examples)
    for i, example in enumerate(examples):
        missing = [k for k in _EXAMPLE_KEYS if k not in example]
        if missing:
            raise UserError(f"example {i} lacks field(s) {', '.join(missing)}")
    conversations = []
    for ex in examples:
        args = (ex["persona"], ex["question"])
        conversations.append(pairwise_prompt(*args, ex["model_response"], ex["baseline_response"], language))
        if both_orders:
            conversations.append(pairwise_prompt(*args, ex["baseline_response"], ex["model_response"], language))
    replies = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        batch_replies = list(judge(batch, temperature=0.0, max_tokens=max_tokens, want_logprobs=True))
        if len(batch_replies) != len(batch):
            raise RuntimeError(f"judge returned {len(batch_replies)} replies for {len(batch)} conversations")
        replies += batch_replies

    per_reply = [_prob_first(r) if r.outcome == ANSWER else (math.nan, True) for r in replies]
    n_unparseable = sum(1 for _, parsed in per_reply if not parsed)
    stride = 2 if both_orders else 1
    outcomes = []
    for i in range(len(examples)):
        own = {r.outcome for r in replies[i * stride : (i + 1) * stride]}
        outcomes.append(NO_ANSWER if NO_ANSWER in own else ROW_ERROR if ROW_ERROR in own else ANSWER)
    model_first = [per_reply[i * stride][0] for i in range(len(examples))]
    model_second = [1 - per_reply[i * stride + 1][0] for i in range(len(examples))] if both_orders else None
    preferences = [(a + b) / 2 for a, b in zip(model_first, model_second)] if both_orders else list(model_first)
    return PairwiseJudgement(
        preferences=preferences,
        model_first=model_first,
        model_second=model_second,
        replies=[r.text for r in replies],
        n_unparseable=n_unparseable,
        outcomes=outcomes,
    )
