"""`cpe-jax demo --quick` runs the whole pipeline end to end, writes its results in the documented
schema, and a rerun resumes instead of redoing the work."""

import json
import math
import os
import subprocess
import sys

import pytest

from cpe_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(out, *extra):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)  # the demo runs on the real (single) CPU device, as a user would
    return subprocess.run([sys.executable, "-m", "cpe_jax.cli", "demo", "--out", str(out), "--quick", *extra],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = _demo(out, "--bt")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_quick_demo_writes_results_report_and_plots(demo_out):
    out, proc = demo_out
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"sft", "ppo", "cpe", "ppo_bt"}
    for name, run in results["runs"].items():
        for key in ("lc_win_rate", "win_rate", "mean_length"):
            assert isinstance(run[key], (int, float)) and math.isfinite(run[key]), (name, key)
        assert 0 <= run["win_rate"] <= 100 and 0 <= run["lc_win_rate"] <= 100
        assert run["mean_length"] > 0
    # The SFT policy is the baseline: against its own responses it wins exactly half.
    assert results["runs"]["sft"]["win_rate"] == 50.0
    # The RL runs are compared on the same held-out set as the baseline.
    eval_set = [json.loads(line) for line in open(out / "eval" / "eval_set.jsonl")]
    for name in ("ppo", "cpe", "ppo_bt"):
        assert results["runs"][name]["n"] == len(eval_set)
        steps = results["runs"][name]["training"]["step"]
        assert steps == list(range(1, len(steps) + 1)) and steps
    # Every policy is decoded as the SFT baseline was: the config's eval sampling, same seed.
    from cpe_jax.demo import CONFIG_DIR, load_config

    eval_config = load_config(os.path.join(CONFIG_DIR, "demo_quick.py")).eval
    for name in ("ppo", "cpe", "ppo_bt"):
        sampling = json.loads((out / "eval" / name / "run.json").read_text())["sampling"]
        assert sampling["temperature"] == eval_config.temperature and sampling["seed"] == results["seed"]
    assert 0 <= results["grm"]["agreement"] <= 1 and results["grm"]["n"] > 0
    from cpe_jax.demo import ASPECT_FLAWS

    by_aspect = results["grm"]["by_aspect"]
    assert list(by_aspect) == list(ASPECT_FLAWS) and all(0 <= v <= 1 for v in by_aspect.values())

    report = (out / "report.md").read_text()
    assert "| Method | LC win rate | Win rate | Length |" in report
    assert "differ in one flaw" in report
    for label in ("SFT", "PPO (GRM)", "CPE (GRM + edit)", "PPO (BT RM)"):
        assert label in report
    for png in ("reward.png", "length.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The progress display names every stage with its number.
    assert "[demo 1/" in proc.stdout and "rl-cpe" in proc.stdout


def test_rerun_resumes_without_redoing_stages(demo_out):
    out, _ = demo_out
    before = (out / "rl" / "cpe" / "metrics.jsonl").read_text()
    timings = json.loads((out / "results.json").read_text())["timings_s"]
    proc = _demo(out, "--bt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = [line for line in proc.stdout.splitlines() if "done earlier, skipped" in line]
    assert len(skipped) >= 10, proc.stdout
    assert (out / "rl" / "cpe" / "metrics.jsonl").read_text() == before
    results = json.loads((out / "results.json").read_text())
    assert results["runs"]["cpe"]["n"] > 0
    # The skipped stages keep the timings of the run that did them.
    assert {k: v for k, v in results["timings_s"].items() if k != "report"} == \
        {k: v for k, v in timings.items() if k != "report"}


def test_short_critiques_name_the_same_problems_with_the_same_scores():
    """The demo distils its GRM on terse critiques: same scores, the concrete culprit still named."""
    from cpe_jax.data import persona_world as pw

    world = pw.make_world(0)
    vegetarian = next(p for p in world.train_personas if p["attributes"]["diet"] == "vegetarian")
    steak = "Certainly. I recommend a grilled steak. Add fresh herbs for more flavor. Best wishes."
    full = pw.teacher_judgement(vegetarian, "What should I cook for dinner?", steak)
    short = pw.teacher_judgement(vegetarian, "What should I cook for dinner?", steak, critique_style="short")
    assert full.split("</critique>")[1] == short.split("</critique>")[1]  # the <scores> block
    assert "not vegetarian: grilled steak" in short
    assert len(short) < len(full)
    padded = "Hey! Grab a tofu stir fry! Grab a tofu stir fry! Grab a tofu stir fry! Have fun!"
    assert "repeats" in pw.teacher_judgement(vegetarian, "What should I cook for dinner?", padded, "short")
    with pytest.raises(UserError):
        pw.teacher_judgement(vegetarian, "What should I cook for dinner?", steak, critique_style="long")


def test_aspect_pairs_differ_in_exactly_the_named_flaw():
    """Each GRM diagnostic pair is a best response against the same draw with one flaw, which the
    teacher notices in that flaw's dimension only."""
    from cpe_jax.data import persona_world as pw
    from cpe_jax.demo import ASPECT_FLAWS, grm_aspect_pairs

    world = pw.make_world(3)
    pairs = grm_aspect_pairs(world, 4, seed=11)
    assert sorted(p.tier for p in pairs) == sorted(list(ASPECT_FLAWS) * 4)
    eval_ids = {p["id"] for p in world.personas("eval")}
    dimension = {"padding": "naturalness", "on_topic": "helpfulness"}
    for pair in pairs:
        assert pair.user_id in eval_ids
        good, bad = (pw.teacher_scores(pair.persona, pair.question, r) for r in (pair.chosen, pair.rejected))
        hit = dimension.get(pair.tier, "personalization")
        assert bad[hit] < good[hit], pair
        assert all(bad[d] == good[d] for d in good if d != hit and d != "helpfulness"), pair
    assert grm_aspect_pairs(world, 4, seed=11) == pairs  # seeded
