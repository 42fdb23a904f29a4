import json
import sys
import textwrap

import pytest

from cpe_jax import cli
from tests.helpers import SHARED_SAMPLE

SAMPLE = SHARED_SAMPLE

JUDGES = textwrap.dedent('''
    import re

    SEEN = []          # responses judged, in order
    STOP_AT = [None]   # raise KeyboardInterrupt when judging this response (simulated crash)
    CALLS = [0]
    PAIRS = [0]        # number of pairs, for the alternating judge


    def response_of(messages):
        return re.search(r"<<<RESPONSE>>>\\n(.*)\\n<<<END RESPONSE>>>", messages[-1]["content"], re.S).group(1)


    def scores(h, p, n):
        return f"<critique>\\nok\\n</critique>\\n<scores>\\nHelpfulness: {h}\\nPersonalization: {p}\\nNatural: {n}\\n</scores>"


    def teacher(messages):
        response = response_of(messages)
        if response == STOP_AT[0]:
            raise KeyboardInterrupt
        SEEN.append(response)
        return "I refuse" if "bad" in response else scores(3, -2, 4)


    def by_length(response):
        return round(5 * len(response) / (len(response) + 500), 6)


    def longer(messages):
        return scores(0, by_length(response_of(messages)), 0)


    def longer_or_garbage(messages):
        response = response_of(messages)
        return "garbage" if len(response) % 2 else scores(0, by_length(response), 0)


    def alternating(messages):
        """Helpfulness 0 in even repeats, 1 in odd ones (repeats are blocks of PAIRS[0] calls)."""
        offset = (CALLS[0] // PAIRS[0]) % 2
        CALLS[0] += 1
        return scores(offset, by_length(response_of(messages)), 0)
''')


@pytest.fixture
def judges(tmp_path, monkeypatch):
    (tmp_path / "fake_judges.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fake_judges", None)
    import fake_judges

    yield fake_judges
    sys.modules.pop("fake_judges", None)


def _write_rows(path, responses):
    rows = [{"persona": {"Name": "Ann"}, "question": f"q{i}", "response": r} for i, r in enumerate(responses)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _label(inp, out, batch_size=2):
    cli.main(["label", "--judge", "python", "--judge-fn", "fake_judges:teacher", "--input", str(inp),
              "--out", str(out), "--batch-size", str(batch_size)])


def test_label_writes_distillation_rows_and_resumes_without_losing_rows(judges, tmp_path, capsys):
    responses = ["r one", "a bad one", "r three", "r four", "r five"]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = _write_rows(inp, responses)
    judges.STOP_AT[0] = "r four"  # dies inside the second batch (rows 3-4)
    with pytest.raises(KeyboardInterrupt):
        _label(inp, out)
    first = out.read_text()
    assert [json.loads(line)["response"] for line in first.splitlines()] == responses[:2]
    with open(out, "a") as f:  # and a row half-written when the process died
        f.write('{"line": 3, "respo')

    judges.STOP_AT[0] = None
    judges.SEEN.clear()
    _label(inp, out)
    assert judges.SEEN == responses[2:]  # finished rows are not judged again
    text = out.read_text()
    assert text.startswith(first)  # finished rows kept byte for byte
    written = [json.loads(line) for line in text.splitlines()]
    assert [r["line"] for r in written] == [1, 2, 3, 4, 5]
    for row, src in zip(written, rows):
        assert {k: row[k] for k in src} == src
        assert row["messages"][-1]["role"] == "assistant"
        assert row["messages"][:-1][-1]["role"] == "user" and src["response"] in row["messages"][-2]["content"]
        assert row["valid"] == ("bad" not in src["response"])
    assert "1 of 5 invalid" in capsys.readouterr().out

    judges.SEEN.clear()
    _label(inp, out)  # nothing left to do
    assert judges.SEEN == [] and out.read_text() == text


def test_label_malformed_row_exits_2_naming_file_and_line(judges, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_rows(inp, ["fine"])
    with open(inp, "a") as f:
        f.write(json.dumps({"persona": "p", "question": "q"}) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        _label(inp, out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{inp}:2: field 'response'" in err and "Traceback" not in err
    assert judges.SEEN == [] and not out.exists()


def _expected(judge):
    """Accuracy of a longer-is-better judge, from the raw files: 1 / 0.5 (tie or unreadable) / 0."""
    outcomes = []
    for tier in ("easy", "mid", "hard"):
        with open(f"{SAMPLE}/rm_benchmark_all/general_{tier}.jsonl") as f:
            for line in f:
                row = json.loads(line)
                a, b = len(row["chosen"]), len(row["reject"])
                if judge == "longer_or_garbage" and (a % 2 or b % 2):
                    outcomes.append(0.5)
                else:
                    outcomes.append(1.0 if a > b else 0.0 if a < b else 0.5)
    return outcomes


@pytest.mark.parametrize("judge", ["longer", "longer_or_garbage"])
def test_rm_eval_with_python_grm_judge_matches_independent_count(judges, tmp_path, judge):
    out = tmp_path / "eval"
    cli.main(["rm-eval", "--data", SAMPLE, "--rm-type", "grm", "--judge", "python",
              "--judge-fn", f"fake_judges:{judge}", "--out", str(out)])
    metrics = json.loads((out / "rm_eval.json").read_text())
    expected = _expected(judge)
    overall = metrics["accuracy"]["overall"]
    assert overall["n"] == len(expected) == 36
    assert overall["accuracy"] == pytest.approx(sum(expected) / len(expected))
    per_tier = [metrics["accuracy"][t]["accuracy"] for t in ("easy", "medium", "hard")]
    assert per_tier == pytest.approx([sum(expected[i:i + 12]) / 12 for i in (0, 12, 24)])
    assert metrics["accuracy"]["general/easy"]["n"] == 12 and "specific" not in metrics["accuracy"]
    if judge == "longer_or_garbage":
        assert overall["invalid"] == sum(1 for o in expected if o == 0.5) > 0
    table = (out / "rm_eval.md").read_text()
    assert f"| overall | 36 | {100 * overall['accuracy']:.1f}% |" in table


def test_rm_eval_names_the_absent_category_above_the_table(judges, tmp_path, capsys):
    out = tmp_path / "eval"
    cli.main(["rm-eval", "--data", SAMPLE, "--rm-type", "grm", "--judge", "python",
              "--judge-fn", "fake_judges:longer", "--out", str(out)])
    metrics = json.loads((out / "rm_eval.json").read_text())
    assert len(metrics["notes"]) == 1 and "no 'specific' pair files" in metrics["notes"][0]
    table = (out / "rm_eval.md").read_text()
    assert table.index("no 'specific' pair files") < table.index("| group |")
    assert "no 'specific' pair files" in capsys.readouterr().out


def _sample_copy(root, empty_tier="hard"):
    """The sample's release layout (persona files copied) with one tier file emptied."""
    import os
    import shutil

    shutil.copytree(f"{SAMPLE}/persona_all", root / "persona_all")
    (root / "rm_benchmark_all").mkdir()
    for tier in ("easy", "mid", "hard"):
        name = f"general_{tier}.jsonl"
        if tier == empty_tier:
            (root / "rm_benchmark_all" / name).write_text("")
        else:
            shutil.copy(os.path.join(SAMPLE, "rm_benchmark_all", name), root / "rm_benchmark_all" / name)
    return str(root)


def test_rm_eval_empty_tier_file_exits_2_unless_allowed(judges, tmp_path, capsys):
    data = _sample_copy(tmp_path / "pf")
    args = ["rm-eval", "--data", data, "--rm-type", "grm", "--judge", "python", "--judge-fn", "fake_judges:longer"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args + ["--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "general/hard: rm_benchmark_all/general_hard.jsonl is empty (found for general: " in err
    assert judges.SEEN == [] and not (tmp_path / "eval").exists()

    cli.main(args + ["--out", str(tmp_path / "eval"), "--tiers", "easy, mid"])
    assert json.loads((tmp_path / "eval" / "rm_eval.json").read_text())["accuracy"]["overall"]["n"] == 24

    cli.main(args + ["--out", str(tmp_path / "allowed"), "--allow-missing"])
    metrics = json.loads((tmp_path / "allowed" / "rm_eval.json").read_text())
    assert metrics["accuracy"]["overall"]["n"] == 24 and "hard" not in metrics["accuracy"]
    warning = [n for n in metrics["notes"] if n.startswith("warning:")]
    assert len(warning) == 1 and "general/hard" in warning[0]
    assert warning[0] in (tmp_path / "allowed" / "rm_eval.md").read_text()
    assert warning[0] in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--tiers", "easy,extreme"], "unknown tier 'extreme'; known: easy, medium (or mid), hard"),
    (["--categories", "specific"], "category 'specific' was asked for but has no pair files"),
])
def test_rm_eval_data_selection_errors_exit_2(judges, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rm-eval", "--data", SAMPLE, "--rm-type", "grm", "--judge", "python",
                  "--judge-fn", "fake_judges:longer", "--out", str(tmp_path), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_rm_eval_repeat_reports_judge_stability(judges, tmp_path):
    judges.PAIRS[0] = 36
    out = tmp_path / "eval"
    cli.main(["rm-eval", "--data", SAMPLE, "--rm-type", "grm", "--judge", "python",
              "--judge-fn", "fake_judges:alternating", "--out", str(out), "--repeat", "2", "--batch-size", "5"])
    stab = json.loads((out / "rm_eval.json").read_text())["stability"]
    assert stab["repeats"] == 2
    assert stab["dimensions"]["helpfulness"] == {"mean_variance": 0.25, "agreement": 0.0, "responses": 72}
    assert stab["dimensions"]["personalization"]["mean_variance"] == 0.0
    assert stab["dimensions"]["personalization"]["agreement"] == 1.0
    assert stab["pair_verdict_agreement"] == 1.0  # the offset shifts both sides of a pair alike
    expected = sum(_expected("longer")) / 36
    assert stab["accuracy_per_repeat"] == pytest.approx([expected, expected])


def test_rm_eval_flag_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rm-eval", "--data", SAMPLE, "--rm-type", "grm", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "--rm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rm-eval", "--data", str(tmp_path / "nope"), "--rm-type", "bt", "--rm", "x", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_accuracy_table_groups_by_every_tier_the_pairs_carry():
    """PersonaFeedback's tiers come first in difficulty order; other tiers (PersonaWorld's one-flaw
    aspects) get their own rows instead of vanishing into "overall"."""
    from cpe_jax.data.personafeedback import PreferencePair
    from cpe_jax.reward.rm_eval import accuracy_table

    def pair(tier, category="general"):
        return PreferencePair(user_id="u", persona={}, question="q", chosen="a", rejected="b",
                              tier=tier, category=category, source="test")

    tiers = ["tone", "hard", "easy", "diet", "tone", "tone"]
    chosen = [1.0, 2.0, 0.0, 1.0, 3.0, 1.0]
    rejected = [0.0, 1.0, 1.0, 1.0, 2.0, 2.0]  # tone: right, right, wrong; diet: tie
    table = accuracy_table([pair(t) for t in tiers], chosen, rejected)
    assert list(table) == ["overall", "general", "easy", "hard", "diet", "tone",
                           "general/easy", "general/hard", "general/diet", "general/tone"]
    assert table["tone"]["n"] == 3 and table["tone"]["accuracy"] == pytest.approx(2 / 3)
    assert table["diet"]["accuracy"] == 0.5 and table["diet"]["ties"] == 1
    assert table["easy"]["accuracy"] == 0.0 and table["hard"]["accuracy"] == 1.0
    assert table["overall"]["accuracy"] == pytest.approx(3.5 / 6)
