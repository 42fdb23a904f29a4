import dataclasses
import hashlib
import json
import logging
import math
import os
import re

import numpy as np
import pytest

from cpe_jax import cli
from cpe_jax.data.personafeedback import load_eval_set
from cpe_jax.eval import lc_win_rate
from cpe_jax.errors import UserError
from cpe_jax.eval.run import evaluate, read_responses
from cpe_jax.reward.judges import CallableJudge, JudgeReply
from tests.helpers import SHARED_SAMPLE

SAMPLE = os.path.join(SHARED_SAMPLE, "generate_data_300")
GPT4O = os.path.join(SAMPLE, "mix_gpt-4o.jsonl")
GPT4O_MINI = os.path.join(SAMPLE, "mix_gpt-4o-mini.jsonl")


def _field(conversation, name):
    text = conversation[-1]["content"]
    return re.search(rf"<<<{name}>>>\n(.*?)\n<<<END {name}>>>", text, re.DOTALL).group(1)


def prob_a(response_a, response_b):
    """A deterministic soft judge: mostly prefers the shorter response, plus a hash-based twist."""
    twist = int(hashlib.sha1((response_a + response_b).encode()).hexdigest()[:6], 16) / 0xFFFFFF - 0.5
    return 1 / (1 + math.exp((len(response_a) - len(response_b)) / 400 - 2 * twist))


def soft_judge(conversation):
    """Importable as `test_eval_cli:soft_judge` for --judge-fn."""
    p = prob_a(_field(conversation, "RESPONSE A"), _field(conversation, "RESPONSE B"))
    return JudgeReply(text="A" if p >= 0.5 else "B", first_token_logprobs={"A": math.log(p), "B": math.log(1 - p)})


def always_a(conversation):
    return "A"


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _run_cli(argv):
    return cli.main(["eval", *argv])


def test_cli_on_sample_end_to_end(tmp_path):
    out = tmp_path / "out"
    _run_cli(["--responses", GPT4O_MINI, "--eval-set", GPT4O, "--judge", "python",
              "--judge-fn", "test_eval_cli:soft_judge", "--out", str(out), "--batch-size", "5"])
    for name in ("annotations.jsonl", "metrics.json", "report.md", "win_rate_by_tier.png", "length_distribution.png"):
        assert (out / name).is_file(), name

    model = [json.loads(line)["response"] for line in open(GPT4O_MINI, encoding="utf-8")]
    base = [json.loads(line)["response"] for line in open(GPT4O, encoding="utf-8")]
    rows = sorted(_rows(out / "annotations.jsonl"), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == list(range(len(base)))
    assert [r["model_response"] for r in rows] == model
    assert [r["baseline_response"] for r in rows] == base
    # Both orders, averaged: reference from the judge function itself.
    expected = [(prob_a(m, b) + 1 - prob_a(b, m)) / 2 for m, b in zip(model, base)]
    np.testing.assert_allclose([r["preference"] for r in rows], expected, atol=1e-9)

    metrics = json.loads((out / "metrics.json").read_text())
    ref = lc_win_rate(expected, [len(m) for m in model], [len(b) for b in base])
    overall = metrics["overall"]
    assert overall["win_rate"] == pytest.approx(100 * np.mean(expected))
    assert overall["lc_win_rate"] == pytest.approx(ref["lc_win_rate"])
    assert overall["mean_model_length"] == pytest.approx(np.mean([len(m) for m in model]))
    assert overall["mean_baseline_length"] == pytest.approx(np.mean([len(b) for b in base]))
    assert metrics["n"] == len(base) and metrics["n_unparseable"] == 0
    assert metrics["judge"] == "python:test_eval_cli:soft_judge"
    assert "Overall" in (out / "report.md").read_text()


def test_resume_keeps_finished_rows_and_judges_only_the_rest(tmp_path):
    examples = load_eval_set(GPT4O)
    responses = [json.loads(line)["response"] for line in open(GPT4O_MINI, encoding="utf-8")]
    calls = {"n": 0, "limit": 9}

    def flaky(conversation):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise RuntimeError("judge went away")
        return soft_judge(conversation)

    judge = CallableJudge(flaky)
    with pytest.raises(RuntimeError):
        evaluate(examples, tmp_path, judge=judge, responses=responses, batch_size=4, judge_label="soft")
    first = _rows(tmp_path / "annotations.jsonl")
    assert [r["index"] for r in first] == [0, 1, 2, 3]  # 8 calls finished chunk one, the 10th failed

    with open(tmp_path / "annotations.jsonl", "a") as f:
        f.write('{"key": "4:')  # a write torn by the interruption is dropped, not an error

    calls.update(n=0, limit=10**9)
    metrics = evaluate(examples, tmp_path, judge=judge, responses=responses, batch_size=4, judge_label="soft")
    assert calls["n"] == 2 * (len(examples) - 4)  # only the missing rows, in both orders
    rows = _rows(tmp_path / "annotations.jsonl")
    assert rows[:4] == first
    assert sorted(r["index"] for r in rows) == list(range(len(examples)))
    assert metrics["n"] == len(examples)

    calls["n"] = 0  # a finished run is not judged again
    evaluate(examples, tmp_path, judge=judge, responses=responses, batch_size=4, judge_label="soft")
    assert calls["n"] == 0


def test_rerun_with_another_judge_is_refused(tmp_path, capsys):
    args = ["--responses", GPT4O_MINI, "--eval-set", GPT4O, "--judge", "python", "--out", str(tmp_path)]
    _run_cli(args + ["--judge-fn", "test_eval_cli:always_a"])
    with pytest.raises(SystemExit) as e:
        _run_cli(args + ["--judge-fn", "test_eval_cli:soft_judge"])
    assert e.value.code == 2
    assert "judge" in capsys.readouterr().err


def test_judge_always_answering_a_gives_fifty(tmp_path):
    examples = load_eval_set(GPT4O)
    responses = [json.loads(line)["response"] for line in open(GPT4O_MINI, encoding="utf-8")]
    metrics = evaluate(examples, tmp_path, judge=CallableJudge(always_a), responses=responses)
    assert metrics["overall"]["win_rate"] == pytest.approx(50.0)
    assert metrics["overall"]["lc_win_rate"] == pytest.approx(50.0, abs=1e-6)
    assert metrics["n_unparseable"] == 0


def test_tiers_and_baseline_file(tmp_path):
    """Per-tier metrics from `tier`; --baseline-responses replaces the eval file's `response`."""
    rows = [json.loads(line) for line in open(GPT4O, encoding="utf-8")]
    for i, row in enumerate(rows):
        row["tier"] = ("easy", "mid")[i % 2]
        row["response"] = "unused"
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    _run_cli(["--responses", GPT4O_MINI, "--eval-set", str(eval_set), "--baseline-responses", GPT4O,
              "--judge", "python", "--judge-fn", "test_eval_cli:soft_judge", "--out", str(tmp_path / "out")])
    annotations = sorted(_rows(tmp_path / "out" / "annotations.jsonl"), key=lambda r: r["index"])
    assert all(r["baseline_response"] != "unused" for r in annotations)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics["by_tier"]) == ["easy", "medium"]
    easy = [r["preference"] for r in annotations if r["tier"] == "easy"]
    assert metrics["by_tier"]["easy"]["win_rate"] == pytest.approx(100 * np.mean(easy))
    assert metrics["by_tier"]["easy"]["n"] == len(easy)


def test_responses_aligned_by_question(tmp_path):
    rows = [json.loads(line) for line in open(GPT4O_MINI, encoding="utf-8")][::-1]
    shuffled = tmp_path / "mini_reversed.jsonl"
    shuffled.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    _run_cli(["--responses", str(shuffled), "--eval-set", GPT4O, "--judge", "python",
              "--judge-fn", "test_eval_cli:always_a", "--out", str(tmp_path / "out")])
    annotations = sorted(_rows(tmp_path / "out" / "annotations.jsonl"), key=lambda r: r["index"])
    assert [r["model_response"] for r in annotations] == [r["response"] for r in rows[::-1]]


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _repeated_questions(tmp_path):
    """An eval set in the released layout (persona as a JSON string) whose two questions are each
    asked of three personas, plus one exact duplicate pair; and the same rows answered, shuffled."""
    sample = _rows(GPT4O)
    other = json.dumps(dict(json.loads(sample[0]["persona"]), Name="Amira"), ensure_ascii=False)
    personas, questions = [sample[0]["persona"], sample[6]["persona"], other], [sample[3]["question"], sample[4]["question"]]
    eval_rows = [{"question": q, "persona": p, "response": f"base {qi}{pi}"}
                 for qi, q in enumerate(questions) for pi, p in enumerate(personas)]
    eval_rows.append(dict(eval_rows[4], response="base dup"))  # the same (persona, question) again
    answers = [{"question": r["question"], "persona": r["persona"], "response": f"answer {i}"}
               for i, r in enumerate(eval_rows)]
    order = [6, 2, 4, 0, 5, 1, 3]  # of the duplicate pair, answer 6 comes first: it goes to example 4
    shuffled = [answers[i] for i in order]
    # Personas reserialized another way (key order, spacing) are still the same persona.
    shuffled[0]["persona"] = json.dumps(dict(reversed(list(json.loads(shuffled[0]["persona"]).items()))))
    return _write(tmp_path / "eval.jsonl", eval_rows), _write(tmp_path / "answers.jsonl", shuffled), answers


def test_repeated_questions_align_by_persona_and_question(tmp_path, caplog):
    eval_set, answers_file, answers = _repeated_questions(tmp_path)
    examples = load_eval_set(eval_set)
    with caplog.at_level(logging.INFO):
        texts = read_responses(answers_file, examples)
    assert texts == [a["response"] for a in answers[:4]] + ["answer 6", "answer 5", "answer 4"]
    assert "aligned to the evaluation set by persona and question" in caplog.text
    _run_cli(["--responses", answers_file, "--eval-set", eval_set, "--judge", "python",
              "--judge-fn", "test_eval_cli:always_a", "--out", str(tmp_path / "out")])
    annotations = sorted(_rows(tmp_path / "out" / "annotations.jsonl"), key=lambda r: r["index"])
    assert [r["model_response"] for r in annotations] == texts
    assert [r["baseline_response"] for r in annotations][-3:] == ["base 11", "base 12", "base dup"]


def test_alignment_by_line_and_by_id(tmp_path, caplog):
    eval_set, _, answers = _repeated_questions(tmp_path)
    examples = load_eval_set(eval_set)
    with caplog.at_level(logging.INFO):
        same = _write(tmp_path / "same.jsonl", answers)
        assert read_responses(same, examples) == [a["response"] for a in answers]
        assert "by line (same length and order, checked by persona and question)" in caplog.text
        bare = _write(tmp_path / "bare.jsonl", [{"response": a["response"]} for a in answers])
        assert read_responses(bare, examples) == [a["response"] for a in answers]
        assert "by line (same length; the rows have no id, persona or question fields)" in caplog.text
    with pytest.raises(UserError, match=r"bare\.jsonl: 6 rows for 7 evaluation questions, and the rows have no"):
        read_responses(_write(tmp_path / "bare.jsonl", [{"response": a["response"]} for a in answers[:6]]), examples)

    with_ids = [dict(json.loads(line), id=f"q{i}") for i, line in enumerate(open(eval_set, encoding="utf-8"))]
    eval_ids = _write(tmp_path / "eval_ids.jsonl", with_ids)
    by_id = [{"id": f"q{i}", "response": f"id answer {i}", "question": "ignored when ids are there"}
             for i in reversed(range(7))]
    assert read_responses(_write(tmp_path / "by_id.jsonl", by_id), load_eval_set(eval_ids)) == [
        f"id answer {i}" for i in range(7)]


@pytest.mark.parametrize("drop,message", [
    (slice(0, 6), r"answers\.jsonl: no row for 1 of 7 evaluation questions \(aligned by persona and question\), "
                  r"the first eval\.jsonl:7"),
    (slice(0, 8), r"answers\.jsonl:8: 1 rows match no evaluation question"),
])
def test_alignment_never_drops_or_invents_a_row(tmp_path, drop, message):
    eval_set, _, answers = _repeated_questions(tmp_path)
    rows = answers + [dict(answers[0], response="one too many")]
    with pytest.raises(UserError, match=message):
        read_responses(_write(tmp_path / "answers.jsonl", rows[drop]), load_eval_set(eval_set))


def test_question_only_rows_refused_when_questions_repeat(tmp_path):
    eval_set, _, answers = _repeated_questions(tmp_path)
    rows = [{"question": a["question"], "response": a["response"]} for a in answers][::-1]
    with pytest.raises(UserError, match="asks .* of several personas; add 'persona'"):
        read_responses(_write(tmp_path / "answers.jsonl", rows), load_eval_set(eval_set))


def test_bad_byte_in_responses_exits_2(tmp_path, capsys):
    lines = open(GPT4O_MINI, "rb").read().split(b"\n")
    lines[5] = lines[5].replace(b'"response": "', b'"response": "\xe9', 1)  # a Latin-1 é
    bad = tmp_path / "mini.jsonl"
    bad.write_bytes(b"\n".join(lines))
    with pytest.raises(SystemExit) as e:
        _run_cli(["--responses", str(bad), "--eval-set", GPT4O, "--judge", "python",
                  "--judge-fn", "test_eval_cli:always_a", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"{bad}:6: not UTF-8 text" in err and len(err.splitlines()) == 1


def test_empty_eval_set_names_the_eval_file(tmp_path, capsys):
    empty = tmp_path / "eval.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit) as e:
        _run_cli(["--responses", GPT4O_MINI, "--eval-set", str(empty), "--judge", "python",
                  "--judge-fn", "test_eval_cli:always_a", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"evaluation file {empty} has no rows" in err and "mini" not in err


def test_unlabelled_eval_set_says_so_and_labels_file_fills_in(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--responses", GPT4O_MINI, "--eval-set", GPT4O, "--judge", "python", "--judge-fn",
            "test_eval_cli:soft_judge"]
    _run_cli(args + ["--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["by_tier"] is None and metrics["by_category"] is None
    assert "no tier labels" in metrics["by_tier_reason"] and "--labels" in metrics["by_tier_reason"]
    report = (out / "report.md").read_text()
    assert "No per-tier rows: the evaluation set has no tier labels" in report and "| tier:" not in report
    assert "No per-tier rows" in capsys.readouterr().out

    rows = _rows(GPT4O)
    tiers = ["easy", "mid", "hard"]
    labels = [{"persona": r["persona"], "question": r["question"], "tier": tiers[i % 3],
               "category": "general" if i < 10 else "specific"} for i, r in enumerate(rows)][::-1]
    labels_file = _write(tmp_path / "labels.jsonl", labels)
    _run_cli(args + ["--out", str(tmp_path / "labelled"), "--labels", labels_file])
    metrics = json.loads((tmp_path / "labelled" / "metrics.json").read_text())
    annotations = sorted(_rows(tmp_path / "labelled" / "annotations.jsonl"), key=lambda r: r["index"])
    assert [r["tier"] for r in annotations] == [("easy", "medium", "hard")[i % 3] for i in range(16)]
    assert list(metrics["by_tier"]) == ["easy", "medium", "hard"]
    assert {k: v["n"] for k, v in metrics["by_category"].items()} == {"specific": 6, "general": 10}
    easy = [r["preference"] for r in annotations if r["tier"] == "easy"]
    assert metrics["by_tier"]["easy"]["win_rate"] == pytest.approx(100 * np.mean(easy))
    assert "by_tier_reason" not in metrics

    labels[0]["tier"] = "extreme"
    with pytest.raises(SystemExit) as e:
        _run_cli(args + ["--out", str(tmp_path / "bad"), "--labels", _write(tmp_path / "labels.jsonl", labels)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "labels.jsonl:1: unknown tier 'extreme'; known: easy, medium (or mid), hard" in err


def test_partly_labelled_eval_set_counts_the_unlabelled(tmp_path):
    examples = load_eval_set(GPT4O)
    labelled = [dataclasses.replace(ex, tier="hard") if i < 10 else ex for i, ex in enumerate(examples)]
    metrics = evaluate(labelled, tmp_path, judge=CallableJudge(always_a), responses=[ex.response for ex in examples])
    assert metrics["by_tier"]["hard"]["n"] == 10 and metrics["by_tier_unlabelled"] == 6
    assert "6 of 16 rows have no tier label" in (tmp_path / "report.md").read_text()


def test_malformed_eval_row_names_file_and_line(tmp_path, capsys):
    lines = open(GPT4O, encoding="utf-8").read().splitlines()
    bad = json.loads(lines[2])
    del bad["question"]
    lines[2] = json.dumps(bad, ensure_ascii=False)
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        _run_cli(["--responses", GPT4O_MINI, "--eval-set", str(eval_set), "--judge", "python",
                  "--judge-fn", "test_eval_cli:always_a", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert f"{eval_set}:3" in err and "question" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--judge", "python"], "--judge-fn"),
    (["--judge", "python", "--judge-fn", "test_eval_cli:always_a", "--base-url", "http://x"], "--base-url"),
    (["--judge", "http", "--base-url", "http://x"], "--judge-model"),
])
def test_bad_flag_combinations_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        _run_cli(["--responses", GPT4O_MINI, "--eval-set", GPT4O, "--out", str(tmp_path), *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_responses_file_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _run_cli(["--responses", str(tmp_path / "nope.jsonl"), "--eval-set", GPT4O, "--judge", "python",
                  "--judge-fn", "test_eval_cli:always_a", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "nope.jsonl" in capsys.readouterr().err


# ---- generating with a policy ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """A tiny random Qwen2 with a locally trained tokenizer, saved as a Hugging Face directory."""
    import torch
    import transformers

    from test_tokenizer import write_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny_policy")
    cfg = transformers.Qwen2Config(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        initializer_range=0.3, eos_token_id=2, bos_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


def test_policy_generation_path(tmp_path, tiny_policy):
    from cpe_jax.data.prompts import policy_messages
    from cpe_jax.sampling import Sampler, SamplingParams
    from cpe_jax.tokenizer import load_tokenizer

    rows = [
        {"question": f"Which {topic} suits me?", "persona": {"Name": name, "Likes": like},
         "response": f"Try the {like} {topic}, it is popular.", "tier": "easy", "category": "specific"}
        for name, like, topic in [("Ann", "quiet", "hotel"), ("Bo", "spicy", "dish"),
                                  ("Cy", "cheap", "phone"), ("Di", "short", "book")]
    ]
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    _run_cli(["--policy", str(tiny_policy), "--eval-set", str(eval_set), "--judge", "python",
              "--judge-fn", "test_eval_cli:soft_judge", "--out", str(out), "--max-tokens", "6",
              "--batch-size", "4"])

    # Reference: the same greedy samples from the ChatML prompt written out by hand.
    tokenizer = load_tokenizer(tiny_policy)
    sampler = Sampler.from_pretrained(tiny_policy)
    prompts = []
    for r in rows:
        content = policy_messages(r["persona"], r["question"])[0]["content"]
        text = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    expected = [o.text for o in sampler.generate(prompts, SamplingParams(max_tokens=6, temperature=0))]

    assert all(expected)  # the tiny model does say something
    annotations = sorted(_rows(out / "annotations.jsonl"), key=lambda r: r["index"])
    assert [a["model_response"] for a in annotations] == expected
    assert [a["baseline_response"] for a in annotations] == [r["response"] for r in rows]
    assert all(a["finish_reason"] in ("stop", "length") for a in annotations)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["overall"]["lc_win_rate"] is None  # too few rows for the GLM
    assert metrics["overall"]["win_rate"] == pytest.approx(100 * np.mean([a["preference"] for a in annotations]))
    generated = _rows(out / "generated.jsonl")
    assert [g["response"] for g in generated] == expected


def test_policy_responses_are_not_regenerated_after_a_judge_failure(tmp_path, tiny_policy):
    from cpe_jax.sampling import Sampler, SamplingParams

    examples = load_eval_set(GPT4O)[:3]
    for ex_i in range(3):  # short prompts so the tiny model's positions suffice
        examples[ex_i] = {"question": f"question {ex_i}?", "persona": {"Name": f"user {ex_i}"},
                          "response": examples[ex_i].response}
    sampler = Sampler.from_pretrained(tiny_policy)
    sampling = SamplingParams(max_tokens=4, temperature=0)

    def broken(conversation):
        raise RuntimeError("judge down")

    with pytest.raises(RuntimeError):
        evaluate(examples, tmp_path, judge=CallableJudge(broken), policy=sampler, sampling=sampling,
                 judge_label="j")
    generated = _rows(tmp_path / "generated.jsonl")
    assert [g["index"] for g in generated] == [0, 1, 2]

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated a cached response")

    sampler.generate = no_generation
    evaluate(examples, tmp_path, judge=CallableJudge(always_a), policy=sampler, sampling=sampling, judge_label="j")
    rows = sorted(_rows(tmp_path / "annotations.jsonl"), key=lambda r: r["index"])
    assert [r["model_response"] for r in rows] == [g["response"] for g in generated]


def test_flax_judge_from_a_model_directory(tmp_path, tiny_policy):
    import cpe_jax
    from cpe_jax.eval import judge_pairs
    from cpe_jax.reward.flax_grm import FlaxGRMJudge
    from cpe_jax.tokenizer import load_tokenizer

    rows = [{"question": f"q{i}?", "persona": {"Name": f"u{i}"}, "response": f"baseline answer {i}"}
            for i in range(3)]
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text("".join(json.dumps(r) + "\n" for r in rows))
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"response": f"model says {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "out"
    _run_cli(["--responses", str(responses), "--eval-set", str(eval_set), "--judge", "flax",
              "--judge-path", str(tiny_policy), "--judge-max-tokens", "2", "--out", str(out)])

    judge = FlaxGRMJudge(cpe_jax.load_model(tiny_policy), load_tokenizer(tiny_policy))
    pairs = [{"persona": r["persona"], "question": r["question"], "model_response": f"model says {i}",
              "baseline_response": r["response"]} for i, r in enumerate(rows)]
    reference = judge_pairs(judge, pairs, max_tokens=2)
    annotations = sorted(_rows(out / "annotations.jsonl"), key=lambda r: r["index"])
    np.testing.assert_allclose([a["preference"] for a in annotations], reference.preferences, atol=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_unparseable"] == reference.n_unparseable
    assert metrics["judge"].startswith("flax:")
