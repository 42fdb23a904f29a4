import json
import os
import re

import numpy as np
import pytest

from cpe_jax import micota
from cpe_jax.cli import main as cli_main
from cpe_jax.metrics import read_metrics
from helpers import make_persona_world_policy

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")


def run_cli(argv, capsys):
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_problems_are_right_and_their_cot_ends_with_the_answer():
    problems = micota.make_problems(50, seed=3, min_steps=2, max_steps=4, max_operand=9)
    for p in problems:
        expression = p["question"][len("Compute "):-1]
        assert re.fullmatch(r"[0-9+\-* ()]+", expression)
        assert eval(expression) == p["answer"]  # Python's own arithmetic as the reference
        assert p["cot"].endswith(f"The answer is {p['answer']}.")
        assert 2 <= p["cot"].count("=") <= 4
    assert micota.make_problems(5, seed=3) == micota.make_problems(5, seed=3)


@pytest.mark.parametrize("text, answer", [
    ("3 + 4 = 7. The answer is 7.", 7),
    ("The answer is -12.", -12),
    ("The answer is 5. Wait. The answer is 8", 8),  # the last statement counts
    ("so 7 + 1 = 8.", None),
    ("The answer is 3.5.", None),
    ("The answer is", None),
])
def test_final_answer(text, answer):
    assert micota.final_answer(text) == answer


def _gen(problem, text, num_tokens):
    return {"problem": problem, "sample": 0, "text": text, "num_tokens": num_tokens}


def test_filter_keeps_exactly_the_correct_answers_inside_the_band():
    problems = [{"question": "a", "answer": 7}, {"question": "b", "answer": -2}]
    generations = [
        _gen(0, "The answer is 7.", 10),   # correct, shortest correct: below the 25th percentile
        _gen(0, "The answer is 7.", 20),   # correct, in band
        _gen(0, "The answer is 8.", 25),   # wrong
        _gen(1, "The answer is -2.", 30),  # correct, in band
        _gen(1, "no answer here", 30),     # no final answer
        _gen(1, "The answer is -2.", 40),  # correct, in band
        _gen(0, "The answer is 7.", 90),   # correct, longest: above the 75th percentile
    ]
    # Correct lengths 10, 20, 30, 40, 90: 25th percentile 20, 75th percentile 40 (linear interpolation).
    kept, stats = micota.filter_generations(generations, problems, low_percentile=25, high_percentile=75)
    assert [g["num_tokens"] for g in kept] == [20, 30, 40]
    assert stats["correct"] == 5 and stats["kept"] == 3 and stats["length_band"] == [20.0, 40.0]

    kept, _ = micota.filter_generations(generations, problems, low_percentile=0, high_percentile=100,
                                        min_tokens=15, max_tokens=35)
    assert [g["num_tokens"] for g in kept] == [20, 30]
    kept, _ = micota.filter_generations(generations, problems, low_percentile=0, high_percentile=100,
                                        max_per_problem=1)
    assert [(g["problem"], g["num_tokens"]) for g in kept] == [(0, 10), (1, 30)]


def test_pipeline_end_to_end_on_arithmetic(tmp_path, capsys):
    """A teacher assistant SFT'd briefly on the reference CoT of the same problems generates at
    temperature 0.7; the student is trained on exactly the correct, in-band answers.

    This proves the plumbing (sampler -> filter -> SFT data -> `cpe-jax sft`) and the filter on
    real generations, not that distillation makes the student better at arithmetic.
    """
    problems = micota.make_problems(8, seed=0)
    ta_init, student = str(tmp_path / "ta_init"), str(tmp_path / "student")
    make_persona_world_policy(ta_init, seed=0, hidden_size=48, intermediate_size=96)
    make_persona_world_policy(student, seed=1)
    ta_data = tmp_path / "ta.jsonl"
    ta_data.write_text("".join(json.dumps({"prompt": micota.prompt_messages(p), "response": p["cot"]}) + "\n"
                               for p in problems))
    code, _ = run_cli(["sft", f"--config={ROOT}/sft.py", f"--workdir={tmp_path / 'ta'}", f"--config.model={ta_init}",
                       f"--config.data.path={ta_data}", "--config.batch_size=8", "--config.total_steps=100", "--config.min_lr_ratio=1.0",
                       "--config.lr=1e-2", "--config.max_length=128", "--config.bucket_size=64",
                       "--config.save_every=100", "--config.progress=False"], capsys)
    assert code == 0

    workdir = tmp_path / "micota"
    code, err = run_cli(["micota", f"--config={ROOT}/micota_cpu.py", f"--workdir={workdir}",
                         f"--config.teacher_assistant={tmp_path / 'ta' / 'final'}", f"--config.student={student}",
                         "--config.data.num_problems=8", "--config.generate.n=4", "--config.generate.max_tokens=48",
                         "--config.mesh.data=2", "--config.sft.mesh.data=2", "--config.sft.batch_size=2",
                         "--config.sft.total_steps=2", "--config.sft.max_length=128", "--config.sft.bucket_size=64",
                         "--config.progress=False"], capsys)
    assert code == 0, err
    generations = [json.loads(line) for line in open(workdir / "generations.jsonl")]
    assert len(generations) == 32 and sorted({g["problem"] for g in generations}) == list(range(8))
    correct = [g for g in generations if micota.final_answer(g["text"]) == problems[g["problem"]]["answer"]]
    assert correct, "the teacher assistant learned no answer; the filter test below would be vacuous"
    low, high = np.percentile([g["num_tokens"] for g in correct], [25, 75])
    expected = [(g["problem"], g["text"]) for g in correct if low <= g["num_tokens"] <= high]
    rows = [json.loads(line) for line in open(workdir / "sft.jsonl")]
    assert [(r["problem"], r["response"]) for r in rows] == expected
    assert 0 < len(expected) < len(correct) < len(generations)  # both the answer check and the band removed some
    stats = json.load(open(workdir / "filter_stats.json"))
    assert stats["generations"] == 32 and stats["correct"] == len(correct) and stats["kept"] == len(rows)
    assert [r["step"] for r in read_metrics(workdir / "student")] == [1, 2]
    assert os.path.exists(workdir / "student" / "final")


@pytest.mark.parametrize("override, message", [
    ("--config.filter.low_percentile=80", "config field filter.low_percentile: must be <= filter.high_percentile"),
    ("--config.generate.n=0", "config field generate.n: must be a positive integer"),
    ("--config.teacher_assistant=", "config field teacher_assistant: set it"),
])
def test_bad_config_exits_2(tmp_path, capsys, override, message):
    code, err = run_cli(["micota", f"--config={ROOT}/micota_cpu.py", f"--workdir={tmp_path}",
                         "--config.teacher_assistant=ta", "--config.student=s", override], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_problem_row_names_file_and_line(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text('{"question": "1 + 1?", "answer": 2}\n{"question": "2 + 2?", "answer": "4"}\n')
    with pytest.raises(micota.UserError, match=r"problems.jsonl:2: a problem row needs"):
        micota.load_problems(str(path))
