"""Teacher-assistant chain-of-thought distillation (the MiCoTA recipe): a mid-size teacher assistant
writes chain-of-thought answers, only correct answers of middling length are kept, and a small
student is fine-tuned on them.

    cpe-jax micota --config=configs/micota_cpu.py --workdir=DIR [--config.a.b=v ...]

Stages (each writes into DIR and is skipped when its output already exists, so a rerun resumes):
  1. problems: `data.path` (JSONL rows {"question": str, "answer": int}) or a synthetic multi-step
     integer arithmetic set (`make_problems`), whose reference CoT ends "The answer is N.";
  2. DIR/generations.jsonl: `generate.n` answers per problem from the teacher assistant through
     `cpe_jax.sampling.Sampler`;
  3. DIR/sft.jsonl + DIR/filter_stats.json: `filter_generations` keeps an answer when its final number
     equals the reference (exact match) and its token length lies in the band: between the
     `filter.low_percentile` and `filter.high_percentile` of the correct answers' lengths and within
     [`filter.min_tokens`, `filter.max_tokens`] (0 = unbounded);
  4. DIR/student: `cpe_jax.sft` (the `cpe-jax sft` trainer, config `sft`) on DIR/sft.jsonl, with
     checkpoints, resume and DIR/student/final.

The same pipeline as functions: make_problems -> generate_cot -> filter_generations ->
write_sft_rows -> `cpe-jax sft --config.data.path=DIR/sft.jsonl`.
"""

import json
import logging
import os
import re

import numpy as np

from cpe_jax.data.jsonl import write_jsonl_atomic
from cpe_jax.errors import UserError

log = logging.getLogger(__name__)

PROMPT = "{question} Think step by step and finish with \"The answer is N.\""
_ANSWER = re.compile(r"The answer is\s*(-?\d+)(?!\.?\d)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


# ---- the synthetic task -----------------------------------------------------------------------


def make_problems(n, *, seed=0, min_steps=2, max_steps=3, max_operand=9):
    """`n` multi-step integer problems {"question", "answer", "cot"}: a left-nested expression such as
    "((7 + 5) * 3) - 4", and a reference chain of thought with one equation per step."""
    rng = np.random.default_rng(seed)
    problems = []
    for _ in range(n):
        value = int(rng.integers(1, max_operand + 1))
        expression, steps = str(value), []
        for k in range(int(rng.integers(min_steps, max_steps + 1))):
            op, operand = str(rng.choice(list(_OPS))), int(rng.integers(1, max_operand + 1))
            result = _OPS[op](value, operand)
            steps.append(f"{value} {op} {operand} = {result}.")
            expression = f"({expression}) {op} {operand}" if k else f"{expression} {op} {operand}"
            value = result
        problems.append({"question": f"Compute {expression}.", "answer": value,
                         "cot": " ".join(steps) + f" The answer is {value}."})
    return problems


def load_problems(path):
    """Problems from a JSONL file of {"question": str, "answer": int} rows (errors name FILE:LINE)."""
    from cpe_jax.data.jsonl import read_jsonl

    problems = []
    for line_no, row in read_jsonl(path, "problems file"):
        answer = row.get("answer")
        if not isinstance(row.get("question"), str) or not isinstance(answer, int) or isinstance(answer, bool):
            raise UserError(f"{path}:{line_no}: a problem row needs \"question\": str and \"answer\": int")
        problems.append({"question": row["question"], "answer": answer})
    if not problems:
        raise UserError(f"{path}: no problems")
    return problems


def final_answer(text):
    """The integer N of the last "The answer is N" in `text`, or None (a decimal N is not an integer answer)."""
    found = _ANSWER.findall(text or "")
    return int(found[-1]) if found else None


def prompt_messages(problem):
    return [{"role": "user", "content": PROMPT.format(question=problem["question"])}]


# ---- generate, filter, write ------------------------------------------------------------------


def generate_cot(sampler, problems, params, *, progress=False):
    """`params.n` teacher-assistant answers per problem: [{"problem", "sample", "text", "num_tokens",
    "finish_reason"}], prompt-major."""
    from cpe_jax.tokenizer import apply_chat_template

    if sampler.tokenizer is None:
        raise UserError("the teacher-assistant model directory has no tokenizer files")
    prompts = [apply_chat_template(sampler.tokenizer, prompt_messages(p)) for p in problems]
    outputs = sampler.generate(prompts, params, progress=progress)
    return [{"problem": o.prompt_index, "sample": o.index, "text": o.text, "num_tokens": len(o.token_ids),
             "finish_reason": o.finish_reason} for o in outputs]


def filter_generations(generations, problems, *, low_percentile=25.0, high_percentile=75.0, min_tokens=0,
                       max_tokens=0, max_per_problem=0):
    """(kept generations, stats): correct final answer, then the length band (see the module docstring).

    The percentile band is taken over the lengths of all correct generations; `max_per_problem` > 0
    keeps at most that many (the first ones) per problem.
    """
    correct = [g for g in generations if final_answer(g["text"]) == problems[g["problem"]]["answer"]]
    lengths = np.asarray([g["num_tokens"] for g in correct], np.float64)
    low, high = float(min_tokens or 0), float(max_tokens or np.inf)
    if len(lengths):
        p_low, p_high = np.percentile(lengths, [low_percentile, high_percentile])
        low, high = max(low, p_low), min(high, p_high)
    kept, per_problem = [], {}
    for g in correct:
        if low <= g["num_tokens"] <= high and (not max_per_problem or per_problem.get(g["problem"], 0) < max_per_problem):
            per_problem[g["problem"]] = per_problem.get(g["problem"], 0) + 1
            kept.append(g)
    stats = {"generations": len(generations), "correct": len(correct), "kept": len(kept),
             "problems_kept": len(per_problem), "length_band": [low, None if np.isinf(high) else high],
             "mean_tokens_correct": float(lengths.mean()) if len(lengths) else None,
             "mean_tokens_kept": float(np.mean([g["num_tokens"] for g in kept])) if kept else None}
    return kept, stats


def write_sft_rows(path, kept, problems):
    """SFT JSONL rows {"prompt": messages, "response": CoT, "problem", "answer"} for `cpe-jax sft`."""
    write_jsonl_atomic(path, [{"prompt": prompt_messages(problems[g["problem"]]), "response": g["text"],
                               "problem": g["problem"], "answer": problems[g["problem"]]["answer"]} for g in kept])


# ---- the pipeline -----------------------------------------------------------------------------


def validate_config(config):
    from cpe_jax import config as cfg

    cfg.check(bool(config.teacher_assistant), "teacher_assistant", "set it to the teacher-assistant model directory")
    cfg.check(bool(config.student), "student", "set it to the student model directory")
    if not config.data.path:
        cfg.check_positive_int(config, "data.num_problems")
        cfg.check_positive_int(config, "data.min_steps")
        cfg.check_positive_int(config, "data.max_steps")
        cfg.check_positive_int(config, "data.max_operand")
        cfg.check(config.data.min_steps <= config.data.max_steps, "data.min_steps", "must be <= data.max_steps")
    for field in ("generate.n", "generate.max_tokens", "generate.batch_size"):
        cfg.check_positive_int(config, field)
    cfg.check_range(config, "generate.temperature", 0)
    cfg.check_range(config, "generate.top_p", 0, 1, low_open=True)
    cfg.check_range(config, "filter.low_percentile", 0, 100)
    cfg.check_range(config, "filter.high_percentile", 0, 100)
    cfg.check(config.filter.low_percentile <= config.filter.high_percentile, "filter.low_percentile",
              "must be <= filter.high_percentile")
    for field in ("filter.min_tokens", "filter.max_tokens", "filter.max_per_problem"):
        cfg.check_positive_int(config, field, allow_zero=True)


def run(config, workdir, *, progress=True):
    """All four stages; returns the filter stats (with the student's final step)."""
    from cpe_jax import sft
    from cpe_jax.sampling import Sampler, SamplingParams
    from cpe_jax.sharding import all_hosts, hosts_meet, write_atomically

    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    d = config.data
    problems = (load_problems(d.path) if d.path else
                make_problems(d.num_problems, seed=d.seed, min_steps=d.min_steps, max_steps=d.max_steps,
                              max_operand=d.max_operand))

    generations_path = os.path.join(workdir, "generations.jsonl")
    if not all_hosts(os.path.exists(generations_path)):  # generating is collective: every host takes one branch
        from cpe_jax.config import make_mesh_from_config

        g = config.generate
        sampler = Sampler.from_pretrained(config.teacher_assistant, mesh=make_mesh_from_config(config),
                                          dtype=config.dtype, max_batch_size=g.batch_size)
        params = SamplingParams(max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p, seed=g.seed, n=g.n)
        generations = generate_cot(sampler, problems, params, progress=progress)
        del sampler
        write_jsonl_atomic(generations_path, generations)  # process 0 writes, the others wait
        hosts_meet("micota generations")
    from cpe_jax.data.jsonl import read_jsonl

    generations = [row for _, row in read_jsonl(generations_path, "generations file")]
    f = config.filter
    kept, stats = filter_generations(generations, problems, low_percentile=f.low_percentile,
                                     high_percentile=f.high_percentile, min_tokens=f.min_tokens,
                                     max_tokens=f.max_tokens, max_per_problem=f.max_per_problem)
    log.info("kept %d of %d generations (%d correct), token band %s", stats["kept"], stats["generations"],
             stats["correct"], stats["length_band"])
    if not kept:
        raise UserError(f"no teacher-assistant answer in {generations_path} is correct and inside the length band; "
                        "check config.teacher_assistant and the filter fields")
    sft_path = os.path.join(workdir, "sft.jsonl")
    write_sft_rows(sft_path, kept, problems)  # process 0 writes, the others wait
    write_atomically(os.path.join(workdir, "filter_stats.json"), json.dumps(stats, indent=2))
    hosts_meet("micota sft rows")

    student_config = config.sft.copy_and_resolve_references()
    with student_config.unlocked():
        student_config.mode = "lm"
        student_config.model = config.student
        student_config.data.path = sft_path
        student_config.progress = progress
    stats["student_steps"] = sft.SFTTrainer(student_config, os.path.join(workdir, "student")).run(progress=progress)
    return stats


def main(argv):
    """`cpe-jax micota --config=configs/micota_cpu.py --workdir=DIR [--config.a.b=v ...]`."""
    from cpe_jax.config import parse_config_flags
    from cpe_jax.train.loop import configure_logging

    config, workdir = parse_config_flags(argv, prog="cpe-jax micota")
    configure_logging()
    stats = run(config, workdir, progress=config.get("progress", True))
    print(f"kept {stats['kept']} of {stats['generations']} teacher-assistant answers ({stats['correct']} correct); "
          f"student trained to step {stats['student_steps']}; final model {os.path.join(workdir, 'student', 'final')}")
    return 0
