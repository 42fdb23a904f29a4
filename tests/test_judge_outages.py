"""A judge that goes away never becomes data: label, eval, rm-eval and an RL step against a loopback
OpenAI-compatible server (tests/loopback_judge.py) that is killed mid-run and restarted, answers
429/503 bursts, hangs past the timeout, and refuses one row with HTTP 400.

Every interrupted run exits 3 with one line (done, remaining, the command that resumes) and stores
no unjudged row; the rerun after the restart judges exactly the missing rows, and its files equal
those of a run that never stopped."""

import json
import os

import pytest

from cpe_jax import cli
from tests.helpers import SHARED_SAMPLE
from tests.loopback_judge import LoopbackJudge, free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def port():
    return free_port()


def http_flags(port, *, retries=1, timeout=0.5, k=3, concurrency=2):
    return ["--judge", "http", "--base-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "grm",
            "--api-key-env", "", "--judge-timeout", str(timeout), "--judge-retries", str(retries),
            "--judge-backoff", "0.01", "--max-consecutive-failures", str(k), "--max-concurrency", str(concurrency)]


def run_cli(argv, capsys):
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read(path):
    with open(path, "rb") as f:
        return f.read()


def jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def assert_exit_3_line(code, err, command):
    assert code == 3, err
    lines = [line for line in err.splitlines() if line.startswith("cpe-jax:")]
    assert len(lines) == 1, err
    assert "judge unavailable" in lines[0] and " done, " in lines[0] and " remaining" in lines[0]
    assert f"resume with: cpe-jax {command}" in lines[0]
    return lines[0]


# ----------------------------------------------------------------------------------------------
# label


def write_label_input(path, n=24):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            response = f"answer number {i}"
            if i == 6:
                response += " REFUSE_ME"  # longer than the server's context: HTTP 400
            if i == 9:
                response += " GARBLE"  # an answer that is no judgement: stored, valid false
            f.write(json.dumps({"id": f"r{i}", "persona": f"persona {i % 3}", "question": f"question {i}",
                                "response": response}) + "\n")


def label_argv(port, inp, out, **kw):
    return ["label", "--input", str(inp), "--out", str(out), "--batch-size", "4", *http_flags(port, **kw)]


@pytest.fixture
def label_reference(tmp_path, port, capsys):
    inp = tmp_path / "in.jsonl"
    write_label_input(inp)
    ref = tmp_path / "ref" / "labels.jsonl"
    with LoopbackJudge(port):
        code, out, err = run_cli(label_argv(port, inp, ref), capsys)
    assert code == 0, err
    rows = jsonl(ref)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(24) if i != 6]
    assert [r["id"] for r in rows if not r["valid"]] == ["r9"]  # the unparseable answer is data
    errors = jsonl(tmp_path / "ref" / "labels.errors.jsonl")
    assert [(e["id"], e["line"]) for e in errors] == [("r6", 7)]
    assert "maximum context length" in errors[0]["error"] and "HTTP 400" in errors[0]["error"]
    assert "1 rows refused" in out and "id r6 (line 7)" in out
    return inp, ref


def test_label_killed_mid_run_exits_3_and_the_rerun_completes_exactly(label_reference, tmp_path, port, capsys):
    inp, ref = label_reference
    out = tmp_path / "run" / "labels.jsonl"
    with LoopbackJudge(port, "--die-after", "9"):
        code, _, err = run_cli(label_argv(port, inp, out), capsys)
    line = assert_exit_3_line(code, err, "label")
    stored = jsonl(out)
    assert 0 < len(stored) < 23
    by_id = {r["id"]: r for r in jsonl(ref)}
    assert all(r == by_id[r["id"]] for r in stored)  # nothing unjudged was stored, not even as invalid
    errors_file = tmp_path / "run" / "labels.errors.jsonl"
    refused = len(jsonl(errors_file)) if errors_file.exists() else 0
    assert f"{len(stored) + refused} rows done, {24 - len(stored) - refused} remaining" in line
    with LoopbackJudge(port):  # restarted: the same command resumes
        code, printed, err = run_cli(label_argv(port, inp, out), capsys)
    assert code == 0, err
    assert f"{23 - len(stored)} rows labelled" in printed
    assert read(out) == read(ref)
    assert read(tmp_path / "run" / "labels.errors.jsonl") == read(tmp_path / "ref" / "labels.errors.jsonl")


@pytest.mark.parametrize("faults, retries", [
    (("--fail-first", "5", "--status", "429"), 6),
    (("--fail-first", "5", "--status", "503"), 6),
    (("--hang-first", "2", "--hang-seconds", "2"), 2),
], ids=["429-burst", "503-burst", "hang-past-timeout"])
def test_label_rides_out_bursts_and_hangs(label_reference, tmp_path, port, capsys, faults, retries):
    inp, ref = label_reference
    out = tmp_path / "run" / "labels.jsonl"
    with LoopbackJudge(port, *faults):
        code, _, err = run_cli(label_argv(port, inp, out, retries=retries, k=8), capsys)
    assert code == 0, err
    assert read(out) == read(ref)


def test_label_stops_at_a_row_error_when_asked_naming_the_row(label_reference, tmp_path, port, capsys):
    inp, _ = label_reference
    out = tmp_path / "strict" / "labels.jsonl"
    with LoopbackJudge(port):
        code, _, err = run_cli(label_argv(port, inp, out, concurrency=1) + ["--no-skip-row-errors"], capsys)
    assert code == 2
    assert f"{inp}:7 (id 'r6')" in err and "maximum context length" in err and "--skip-row-errors" in err
    assert [r["id"] for r in jsonl(out)] == [f"r{i}" for i in range(6)]  # finished rows kept
    assert not os.path.exists(tmp_path / "strict" / "labels.errors.jsonl")


def test_label_against_a_dead_server_stores_nothing(tmp_path, port, capsys):
    inp = tmp_path / "in.jsonl"
    write_label_input(inp, n=8)
    out = tmp_path / "labels.jsonl"
    code, _, err = run_cli(label_argv(port, inp, out), capsys)  # nothing listens on the port
    line = assert_exit_3_line(code, err, "label")
    assert "0 rows done, 8 remaining" in line and "APIConnectionError" in line
    assert not out.exists() or out.read_text() == ""


# ----------------------------------------------------------------------------------------------
# eval


def write_eval_files(tmp_path, n=12):
    eval_set, responses = tmp_path / "eval_set.jsonl", tmp_path / "responses.jsonl"
    with open(eval_set, "w") as f, open(responses, "w") as g:
        for i in range(n):
            f.write(json.dumps({"id": i, "question": f"question {i}", "persona": {"Name": f"user {i % 4}"},
                                "response": f"baseline answer {i}" + " padding" * (i % 3)}) + "\n")
            g.write(json.dumps({"id": i, "response": f"policy answer {i}" + (" REFUSE_ME" if i == 4 else "")
                                + " more" * (i % 5)}) + "\n")
    return eval_set, responses


def eval_argv(port, eval_set, responses, out, *extra):
    return ["eval", "--responses", str(responses), "--eval-set", str(eval_set), "--out", str(out),
            "--batch-size", "3", *http_flags(port), *extra]


def test_eval_killed_mid_run_reports_no_win_rate_and_the_rerun_completes_exactly(tmp_path, port, capsys):
    eval_set, responses = write_eval_files(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    with LoopbackJudge(port):
        code, printed, err = run_cli(eval_argv(port, eval_set, responses, ref), capsys)
    assert code == 0, err
    assert "1 examples refused" in printed and "id 4 (line 5): HTTP 400" in printed
    metrics = json.loads((ref / "metrics.json").read_text())
    assert (metrics["judged"], metrics["unjudged"], metrics["row_errors"]) == (11, 0, 1)
    assert metrics["overall"]["n"] == 11 and [e["id"] for e in jsonl(ref / "errors.jsonl")] == [4]

    strict = tmp_path / "strict"
    with LoopbackJudge(port):
        code, _, err = run_cli(eval_argv(port, eval_set, responses, strict, "--no-skip-row-errors"), capsys)
    assert code == 2 and "eval_set.jsonl:5 (id 4)" in err and "maximum context length" in err

    with LoopbackJudge(port, "--die-after", "9"):
        code, _, err = run_cli(eval_argv(port, eval_set, responses, run), capsys)
    assert_exit_3_line(code, err, "eval")
    partial = json.loads((run / "metrics.json").read_text())
    assert partial["win_rate"] is None and "overall" not in partial and partial["unjudged"] > 0
    stored = jsonl(run / "annotations.jsonl")
    assert len(stored) == partial["judged"] and len(stored) + partial["unjudged"] + partial["row_errors"] == 12
    reference_rows = {r["key"]: r for r in jsonl(ref / "annotations.jsonl")}
    assert all(r == reference_rows[r["key"]] for r in stored)  # no 0.5 draw stood in for a missing verdict

    # --allow-partial: the win rate of the judged examples, and the report says so (still exit 3)
    code, _, err = run_cli(eval_argv(port, eval_set, responses, run, "--allow-partial"), capsys)
    assert_exit_3_line(code, err, "eval")
    partial = json.loads((run / "metrics.json").read_text())
    assert partial["overall"]["n"] == len(stored) and "partial" in partial
    assert "--allow-partial" in (run / "report.md").read_text()

    with LoopbackJudge(port):
        code, _, err = run_cli(eval_argv(port, eval_set, responses, run), capsys)
    assert code == 0, err
    for name in ("annotations.jsonl", "errors.jsonl", "metrics.json", "report.md"):
        assert read(run / name) == read(ref / name), name


# ----------------------------------------------------------------------------------------------
# rm-eval


def rm_eval_argv(port, out):
    return ["rm-eval", "--data", SHARED_SAMPLE, "--rm-type", "grm", "--out", str(out), "--batch-size", "8",
            *http_flags(port)]


def test_rm_eval_killed_mid_run_writes_no_accuracy_and_the_rerun_completes_exactly(tmp_path, port, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    with LoopbackJudge(port):
        code, _, err = run_cli(rm_eval_argv(port, ref), capsys)
    assert code == 0, err
    metrics = json.loads((ref / "rm_eval.json").read_text())
    n = metrics["accuracy"]["overall"]["n"]
    assert (metrics["judged"], metrics["unjudged"], metrics["row_errors"]) == (n, 0, 0)

    with LoopbackJudge(port, "--die-after", "20"):
        code, _, err = run_cli(rm_eval_argv(port, run), capsys)
    line = assert_exit_3_line(code, err, "rm-eval")
    assert " pairs done" in line
    assert not (run / "rm_eval.json").exists()
    judged = jsonl(run / "rm_eval_judgements.jsonl")
    assert 0 < len(judged) < 2 * n and all(j["valid"] for j in judged)  # no failed call became a judgement

    with LoopbackJudge(port):
        code, _, err = run_cli(rm_eval_argv(port, run), capsys)
    assert code == 0, err
    for name in ("rm_eval.json", "rm_eval.md", "rm_eval_pairs.jsonl", "rm_eval_judgements.jsonl"):
        assert read(run / name) == read(ref / name), name


# ----------------------------------------------------------------------------------------------
# one RL step with the HTTP GRM


def test_rl_step_whose_grm_is_down_is_not_trained_on(tmp_path, port, capsys):
    from tests.helpers import make_persona_world_policy

    policy = tmp_path / "policy"
    make_persona_world_policy(policy)
    workdir = tmp_path / "work"
    argv = ["train", f"--config={REPO}/configs/smoke.py", f"--workdir={workdir}", f"--config.policy={policy}",
            "--config.total_steps=2", "--config.save_every=100", "--config.grm.type=http",
            f"--config.grm.base_url=http://127.0.0.1:{port}/v1", "--config.grm.model_name=grm",
            "--config.grm.api_key_env=", "--config.grm.timeout=0.5", "--config.grm.max_retries=1",
            "--config.grm.backoff_base=0.01", "--config.grm.max_consecutive_failures=3"]
    # One step judges 8 responses (score and critique) and 8 edits: 24 calls; the server dies after them.
    with LoopbackJudge(port, "--die-after", "24"):
        code, _, err = run_cli(argv, capsys)
    line = assert_exit_3_line(code, err, "train")
    assert "steps done" in line and "not trained" in line
    metrics_file = workdir / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in open(metrics_file)] if metrics_file.exists() else []
    saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps == [1] and saved == [1]  # step 1 trained and saved; step 2 was not trained on
    with LoopbackJudge(port):
        code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert [json.loads(line)["step"] for line in open(metrics_file)] == [1, 2]  # no step lost or doubled
    assert (workdir / "final").exists()


def test_pairwise_judge_without_an_answer_is_never_a_draw():
    import math

    from cpe_jax.errors import UserError
    from cpe_jax.eval.winrate import judge_pairs, raw_win_rate
    from cpe_jax.reward.judges import ANSWER, NO_ANSWER, CallableJudge, JudgeReply

    def judge(conversation):
        text = conversation[-1]["content"]
        return JudgeReply("", outcome=NO_ANSWER, error="timeout") if "silent" in text else "A"

    examples = [{"persona": "p", "question": f"q{i}", "model_response": "silent" if i == 1 else "m",
                 "baseline_response": "b"} for i in range(3)]
    result = judge_pairs(CallableJudge(judge), examples)
    assert result.outcomes == [ANSWER, NO_ANSWER, ANSWER] and result.n_unparseable == 0
    assert result.preferences[0] == 0.5 and math.isnan(result.preferences[1])
    with pytest.raises(UserError, match="preferences\\[1\\]"):
        raw_win_rate(result.preferences, [1, 1, 1], [1, 1, 1])


def test_rm_eval_leaves_out_a_pair_whose_response_the_judge_refused(tmp_path):
    from cpe_jax.data.personafeedback import find_pair_files, read_pairs
    from cpe_jax.reward import rm_eval
    from cpe_jax.reward.grm import GRMScorer
    from cpe_jax.reward.judges import ROW_ERROR, CallableJudge, JudgeReply
    from tests.loopback_judge import grm_answer

    pairs = read_pairs(find_pair_files(SHARED_SAMPLE))
    refused_text = pairs[3].rejected

    def judge(conversation):
        text = conversation[-1]["content"]
        if refused_text in text:
            return JudgeReply("", outcome=ROW_ERROR, error="HTTP 400: maximum context length is 64 tokens")
        return grm_answer(text)

    scores = rm_eval.grm_pair_scores(GRMScorer(CallableJudge(judge)), pairs, batch_size=7, out_dir=str(tmp_path))
    refused = [i for i, p in enumerate(pairs) if p.rejected == refused_text]
    assert sorted(int(i) for i in scores["refused"].nonzero()[0]) == refused
    metrics = rm_eval.evaluate(pairs, scores, str(tmp_path))
    assert (metrics["judged"], metrics["row_errors"]) == (len(pairs) - len(refused), len(refused))
    assert metrics["accuracy"]["overall"]["n"] == len(pairs) - len(refused)
    errors = jsonl(tmp_path / "errors.jsonl")
    assert [e["id"] for e in errors] == [pairs[i].source for i in refused] and "context length" in errors[0]["error"]
    assert any("left out" in note for note in metrics["notes"])
