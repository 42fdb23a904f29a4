import math
import re

import numpy as np
import pytest

from cpe_jax.errors import UserError
from cpe_jax.eval import judge_pairs, lc_win_rate, raw_win_rate
from cpe_jax.eval.winrate import parse_verdict, pairwise_prompt
from cpe_jax.reward.judges import CallableJudge, JudgeReply


def judged_pairs(seed, n, length_effect, model_effect, soft, tie_fraction=0.0):
    """Synthetic judgements whose preferences follow a known logistic length effect."""
    rng = np.random.default_rng(seed)
    model_len = rng.integers(200, 3000, n)
    base_len = rng.integers(300, 2000, n)
    delta = model_len - base_len
    q = 1 / (1 + np.exp(-(model_effect + length_effect * np.tanh(delta / delta.std()))))
    p = q if soft else (rng.random(n) < q).astype(float)
    p[rng.random(n) < tie_fraction] = 0.5
    if soft:
        p = np.round(p, 3)
    return p, model_len, base_len


# Values printed by AlpacaEval 0.6.6 itself (get_length_controlled_winrate with
# glm_name="length_controlled_minimal") on exactly these synthetic cases.
ALPACA_EVAL_REFERENCE = [
    (dict(seed=1, n=300, length_effect=1.5, model_effect=0.0, soft=False, tie_fraction=0.1), 62.0, 52.4213),
    (dict(seed=2, n=120, length_effect=0.8, model_effect=0.4, soft=True, tie_fraction=0.2), 62.4133, 57.4428),
    (dict(seed=3, n=40, length_effect=-1.0, model_effect=-0.3, soft=False), 37.5, 50.0),
]


@pytest.mark.parametrize("spec, raw, lc", ALPACA_EVAL_REFERENCE)
def test_agrees_with_alpaca_eval(spec, raw, lc):
    m = lc_win_rate(*judged_pairs(**spec))
    assert m["win_rate"] == pytest.approx(raw, abs=1e-3)
    assert m["lc_win_rate"] == pytest.approx(lc, abs=0.5)
    assert m["n"] == spec["n"]


def newton_soft_logistic(X, p, steps=50):
    """Unregularized logistic MLE on soft labels by Newton's method (independent of sklearn)."""
    w = np.zeros(X.shape[1])
    for _ in range(steps):
        q = 1 / (1 + np.exp(-X @ w))
        w += np.linalg.solve((X * (q * (1 - q))[:, None]).T @ X, X.T @ (p - q))
    return w


def test_soft_labels_match_direct_glm_fit():
    # Plenty of clean soft labels: cross-validation keeps regularization negligible, so the fit
    # must be the plain maximum-likelihood GLM on tanh(delta / std(delta)) and a model column.
    p, model_len, base_len = judged_pairs(seed=4, n=400, length_effect=1.2, model_effect=0.5, soft=True)
    delta = model_len - base_len
    X = np.stack([np.tanh(delta / delta.std(ddof=1)), np.ones(len(p))], axis=1)
    w = newton_soft_logistic(X, p)
    m = lc_win_rate(p, model_len, base_len)
    assert m["lc_win_rate"] == pytest.approx(100 / (1 + math.exp(-w[1])), abs=0.1)
    assert m["length_coefficient"] == pytest.approx(w[0], abs=0.02)
    assert m["lc_win_rate"] == pytest.approx(100 / (1 + math.exp(-0.5)), abs=0.5)  # the true model effect


def test_longer_but_not_better_loses_its_length_advantage():
    # The judge only likes length; the model is systematically longer.
    rng = np.random.default_rng(5)
    base_len = rng.integers(300, 1500, 300)
    model_len = base_len + rng.integers(-250, 1200, 300)
    p = (model_len > base_len).astype(float)
    p[rng.random(300) < 0.15] = 0.5
    m = lc_win_rate(p, model_len, base_len)
    assert m["win_rate"] > 65
    assert m["lc_win_rate"] < m["win_rate"] - 10
    assert m["length_coefficient"] > 0


def test_equal_lengths_give_the_raw_rate():
    rng = np.random.default_rng(6)
    p = (rng.random(200) < 0.7).astype(float)
    p[:20] = 0.5
    lengths = rng.integers(100, 2000, 200)
    m = lc_win_rate(p, lengths, lengths)
    assert m["lc_win_rate"] == pytest.approx(100 * p.mean(), abs=0.5)
    assert m["lc_standard_error"] == pytest.approx(100 * p.std(ddof=1) / math.sqrt(200), rel=0.05)
    assert m["mean_model_length"] == m["mean_baseline_length"] == pytest.approx(lengths.mean())


def test_symmetric_data_gives_fifty():
    # Every judgement is mirrored: the same pair with the roles swapped.
    p, model_len, base_len = judged_pairs(seed=7, n=100, length_effect=1.0, model_effect=0.7, soft=False)
    m = lc_win_rate(np.concatenate([p, 1 - p]), np.concatenate([model_len, base_len]),
                    np.concatenate([base_len, model_len]))
    assert m["win_rate"] == pytest.approx(50)
    assert m["lc_win_rate"] == pytest.approx(50, abs=0.1)


def test_all_ties():
    rng = np.random.default_rng(8)
    m = lc_win_rate(np.full(50, 0.5), rng.integers(100, 900, 50), rng.integers(100, 900, 50))
    assert m["win_rate"] == 50 and m["n_draws"] == 50
    assert m["lc_win_rate"] == pytest.approx(50, abs=1e-6)


def test_raw_rate_counts():
    m = raw_win_rate([1, 0, 0.5, 0.75], [10, 20, 30, 40], [5, 5, 5, 5])
    assert m["win_rate"] == pytest.approx(56.25)
    assert (m["n_wins"], m["n_losses"], m["n_draws"]) == (2, 1, 1)
    assert m["standard_error"] == pytest.approx(100 * np.std([1, 0, 0.5, 0.75], ddof=1) / 2)
    assert m["mean_model_length"] == 25


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (([1.0] * 20, [10] * 19, [10] * 20), {}, "differ in length"),
        (([1.0] * 19 + [1.2], [10] * 20, [10] * 20), {}, r"preferences\[19\]"),
        (([1.0] * 19 + [float("nan")], [10] * 20, [10] * 20), {}, r"preferences\[19\] is nan"),
        (([1.0] * 20, [10] * 19 + [float("inf")], [10] * 20), {}, r"model_lengths\[19\]"),
        (([1.0] * 4, [10] * 4, [10] * 4), {}, "at least 10 rows"),
        (([1.0] * 20, [10] * 20, [10] * 20), {"groups": [0, 1] * 10}, "in 2 groups"),
        (([1.0] * 20, [10] * 20, [10] * 20), {"groups": [0] * 3}, "groups has 3"),
    ],
)
def test_bad_input_names_the_problem(args, kwargs, message):
    with pytest.raises(UserError, match=message):
        lc_win_rate(*args, **kwargs)


def test_groups_keep_repeated_questions_together():
    p, model_len, base_len = judged_pairs(seed=9, n=60, length_effect=1.0, model_effect=0.2, soft=True)
    m = lc_win_rate(p, model_len, base_len, groups=[f"q{i // 3}" for i in range(60)])
    assert 0 < m["lc_win_rate"] < 100 and m["n"] == 60


# ----------------------------------------------------------------------------------------------
# Pairwise judging


def field(conversation, name):
    text = conversation[-1]["content"]
    return re.search(rf"<<<{name}>>>\n(.*?)\n<<<END {name}>>>", text, re.S).group(1)


def examples(n=6):
    return [
        dict(persona=f"persona {i}", question=f"question {i}",
             model_response="m" * (10 + 40 * (i % 2)), baseline_response="b" * 30)
        for i in range(n)
    ]


def test_prompt_has_delimited_fields_in_the_given_order():
    messages = pairwise_prompt("likes cats", "what pet?", "first reply", "second reply")
    assert messages[0]["role"] == "system" and "shorter" in messages[0]["content"]
    assert field(messages, "PERSONA") == "likes cats"
    assert field(messages, "QUESTION") == "what pet?"
    assert field(messages, "RESPONSE A") == "first reply"
    assert field(messages, "RESPONSE B") == "second reply"


def test_judge_always_answering_a_gives_fifty():
    seen = []
    judge = CallableJudge(lambda conv: seen.append(conv) or "A. It is better.")
    result = judge_pairs(judge, examples())
    assert len(seen) == 12  # both orders of each pair
    assert result.preferences == [0.5] * 6
    assert raw_win_rate(result.preferences, [1] * 6, [1] * 6)["win_rate"] == 50
    assert result.model_first == [1.0] * 6 and result.model_second == [0.0] * 6
    assert result.n_unparseable == 0


def test_judge_preferring_the_shorter_response():
    def shorter(conv):
        return "A" if len(field(conv, "RESPONSE A")) <= len(field(conv, "RESPONSE B")) else "B"

    batches = []

    def judge(conversations, **kwargs):
        batches.append(len(conversations))
        return CallableJudge(shorter)(conversations, **kwargs)

    exs = examples(7)
    result = judge_pairs(judge, exs, batch_size=4)
    assert batches == [4, 4, 4, 2]
    expected = [1.0 if len(e["model_response"]) < len(e["baseline_response"]) else 0.0 for e in exs]
    assert result.preferences == expected


def test_logprob_preferences_are_the_two_way_softmax():
    rng = np.random.default_rng(0)
    logprobs = {}

    def judge(conv):
        la, lb = rng.normal(size=2) - 1
        logprobs[(field(conv, "QUESTION"), field(conv, "RESPONSE A")[0])] = (la, lb)
        return JudgeReply(text="B", first_token_logprobs={"A": la, "B": lb, "The": -0.1})

    exs = examples(4)
    result = judge_pairs(CallableJudge(judge), exs)
    for ex, pref in zip(exs, result.preferences):
        la1, lb1 = logprobs[(ex["question"], "m")]  # model shown first
        la2, lb2 = logprobs[(ex["question"], "b")]  # model shown second
        first = math.exp(la1) / (math.exp(la1) + math.exp(lb1))
        second = math.exp(lb2) / (math.exp(la2) + math.exp(lb2))
        assert pref == pytest.approx((first + second) / 2, abs=1e-12)


def test_token_variants_are_pooled_and_missing_letter_is_zero():
    def judge(conv):
        if field(conv, "RESPONSE A")[0] == "m":
            return JudgeReply("A", {"A": math.log(0.3), " A": math.log(0.1), "B": math.log(0.4)})
        return JudgeReply("B", {" B": -0.01, "I": -5.0})

    result = judge_pairs(CallableJudge(judge), examples(1))
    assert result.model_first == [pytest.approx(0.5)]
    assert result.model_second == [pytest.approx(1.0)]


def test_unparseable_replies_count_as_ties():
    replies = iter(["As a judge I cannot decide", "**B** is better", "", "Response A", "a", "B"])
    result = judge_pairs(CallableJudge(lambda conv: next(replies)), examples(3))
    assert result.n_unparseable == 3
    assert result.preferences == [0.5 * (0.5 + 1.0), 0.5 * (0.5 + 0.0), 0.5 * (0.5 + 1.0)]
    assert len(result.replies) == 6


def test_single_order_and_missing_field():
    calls = []
    result = judge_pairs(CallableJudge(lambda conv: calls.append(1) or "B"), examples(3), both_orders=False)
    assert len(calls) == 3 and result.preferences == [0.0] * 3 and result.model_second is None
    with pytest.raises(UserError, match="example 0 lacks field.*baseline_response"):
        judge_pairs(CallableJudge(lambda conv: "A"), [dict(persona="", question="", model_response="")])


@pytest.mark.parametrize(
    "text, verdict",
    [("A", "A"), (" B: shorter", "B"), ("**A**", "A"), ("(B)", "B"), ("Response B is better", "B"),
     ("回答A更好", "A"), ("As I see it", None), ("a", None), ("Both", None), ("ABC", None)],
)
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict
