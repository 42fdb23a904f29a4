import json
import os

import numpy as np
import pytest

from cpe_jax.errors import UserError
from cpe_jax.eval import lc_win_rate, summarize, write_report

TIERS = ("hard", "easy", "mid")


def annotation_rows(n=90, seed=0):
    """Rows as the eval writes them; the 'hard' tier gets only 6 rows (too few for the GLM)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        tier = "hard" if i < 6 else ("easy" if i % 2 else "mid")
        model_length, baseline_length = int(rng.integers(200, 2500)), int(rng.integers(300, 1800))
        p = float(rng.random() < (0.75 if model_length > baseline_length else 0.4))
        rows.append(dict(id=i, tier=tier, category="specific" if i % 3 else "general",
                         preference=p, model_length=model_length, baseline_length=baseline_length))
    return rows


def column(rows, key):
    return [r[key] for r in rows]


def test_summarize_groups_by_tier_and_category():
    rows = annotation_rows()
    s = summarize(rows)
    assert list(s["by_tier"]) == ["easy", "mid", "hard"]  # difficulty order, not input order
    assert list(s["by_category"]) == ["specific", "general"]
    overall = lc_win_rate(column(rows, "preference"), column(rows, "model_length"), column(rows, "baseline_length"))
    assert s["overall"]["lc_win_rate"] == pytest.approx(overall["lc_win_rate"])
    assert s["overall"]["win_rate"] == pytest.approx(100 * np.mean(column(rows, "preference")))

    easy = [r for r in rows if r["tier"] == "easy"]
    assert s["by_tier"]["easy"]["n"] == len(easy)
    assert s["by_tier"]["easy"]["win_rate"] == pytest.approx(100 * np.mean(column(easy, "preference")))
    assert s["by_tier"]["easy"]["lc_win_rate"] is not None

    hard = s["by_tier"]["hard"]
    assert hard["n"] == 6 and hard["lc_win_rate"] is None and hard["lc_standard_error"] is None
    assert hard["win_rate"] == pytest.approx(100 * np.mean(column(rows[:6], "preference")))
    assert hard["mean_model_length"] == pytest.approx(np.mean(column(rows[:6], "model_length")))


def test_rows_without_tier_only_count_overall():
    rows = annotation_rows(30)
    for r in rows:
        del r["tier"], r["category"]
    s = summarize(rows)
    assert s["by_tier"] is None and s["by_category"] is None and s["overall"]["n"] == 30
    assert "no tier labels" in s["by_tier_reason"] and "no category labels" in s["by_category_reason"]


def test_bad_rows_name_the_row():
    rows = annotation_rows(12)
    del rows[4]["baseline_length"]
    with pytest.raises(UserError, match="row 4 lacks baseline_length"):
        summarize(rows)
    with pytest.raises(UserError, match="no annotation rows"):
        summarize([])


def test_write_report_files(tmp_path):
    rows = annotation_rows()
    metrics = dict(summarize(rows), judge="callable", n_unparseable=2)
    out = tmp_path / "report"
    paths = write_report(out, metrics, rows)
    assert sorted(os.listdir(out)) == sorted(
        ["metrics.json", "report.md", "win_rate_by_tier.png", "length_distribution.png"])

    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"overall", "by_tier", "by_category", "judge", "n_unparseable"}
    assert {"win_rate", "lc_win_rate", "lc_standard_error", "standard_error", "n",
            "mean_model_length", "mean_baseline_length"} <= set(saved["overall"])
    assert saved["by_tier"]["hard"]["lc_win_rate"] is None

    report = (out / "report.md").read_text()
    overall = metrics["overall"]
    assert (f"| Overall | 90 | {overall['win_rate']:.1f} ± {overall['standard_error']:.1f} "
            f"| {overall['lc_win_rate']:.1f} ± {overall['lc_standard_error']:.1f} |") in report
    for label in ("tier: easy", "tier: mid", "tier: hard", "category: specific", "category: general"):
        assert f"| {label} |" in report
    assert "- n_unparseable: 2" in report

    for name in ("win_rate_by_tier.png", "length_distribution.png"):
        with open(paths[name], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_write_report_wants_summarize_output(tmp_path):
    with pytest.raises(UserError, match="overall"):
        write_report(tmp_path, {"win_rate": 50.0}, annotation_rows(10))
