"""Evaluate a policy (or another system's responses) against a baseline with a pairwise judge.

`evaluate` generates the policy's responses (or takes them from a file), judges each against the
baseline in both presentation orders and writes into one output directory:

- `annotations.jsonl`: one row per example, appended and flushed as soon as its chunk is judged.
  Rows are keyed by the example's index in the evaluation set and a hash of its question, so a
  rerun keeps finished rows and only generates and judges the rest;
- `generated.jsonl`: the policy's responses, cached the same way, so an interruption while
  judging never costs a regeneration;
- `run.json`: judge, policy, prompt and sampling settings; a rerun with other settings is refused
  instead of mixing two runs in one table;
- `errors.jsonl`: examples the judge refused (HTTP 400/413/422: too long, filtered), with their
  id, line and the server's message; skipped, counted as `row_errors` and never resent;
- `metrics.json`, `report.md` and the plots of `eval.report.write_report`.

A judge call that gets no answer (server down, timeout, 429/5xx after the retries, empty reply)
leaves its example out of every file; a rerun judges it. After `max_consecutive_failures` such
calls in a row judging stops at once. While examples are unjudged, metrics.json reports `judged`,
`unjudged` and `row_errors` and no win rate (unless `allow_partial`: then the win rate of the
judged examples, marked partial), and JudgeUnavailable is raised (exit code 3).
"""

import dataclasses
import hashlib
import json
import logging
import os
import sys

from cpe_jax.errors import JudgeUnavailable, UserError
from cpe_jax.eval.report import METRICS_FILE, summarize, write_report
from cpe_jax.eval.winrate import judge_pairs, parse_verdict, prob_first_from_logprobs
from cpe_jax.data.jsonl import JsonlAppender, read_finished_rows, write_jsonl_atomic
from cpe_jax.reward.judges import DEFAULT_MAX_CONSECUTIVE_FAILURES, NO_ANSWER, ROW_ERROR, FailureStreak, RowErrorLog

log = logging.getLogger(__name__)

ANNOTATIONS_FILE = "annotations.jsonl"
GENERATED_FILE = "generated.jsonl"
ERRORS_FILE = "errors.jsonl"
RUN_FILE = "run.json"
POLICY_PROMPTS = ("paper", "persona_world")

DEFAULT_MAX_TOKENS = 1024


# ----------------------------------------------------------------------------------------------
# Examples, keys and response files


def example_key(index, question):
    """The resume key of example `index`: its position plus a hash of its question text."""
    digest = hashlib.sha1(question.encode("utf-8")).hexdigest()[:16]
    return f"{index}:{digest}"


def _as_dict(example, index):
    """An EvalExample or a plain dict as a dict with the fields evaluation needs."""
    if dataclasses.is_dataclass(example):
        example = dataclasses.asdict(example)
    if not isinstance(example, dict):
        raise UserError(f"evaluation example {index} must be an EvalExample or a dict, got {type(example).__name__}")
    for name in ("question", "persona"):
        if name not in example:
            raise UserError(f"evaluation example {index} lacks field {name!r}")
    if not isinstance(example["question"], str):
        raise UserError(f"evaluation example {index}: field 'question' must be a string")
    return {
        "question": example["question"],
        "persona": example["persona"],
        "response": example.get("response"),
        "source": example.get("source") or f"example {index}",
        "tier": example.get("tier"),
        "category": example.get("category"),
        "id": example.get("id"),
    }


def _persona_key(persona):
    """A persona (object, or a string holding one) as canonical JSON, so equal personas compare equal."""
    if isinstance(persona, str):
        try:
            persona = json.loads(persona)
        except json.JSONDecodeError:
            return persona
    return json.dumps(persona, sort_keys=True, ensure_ascii=False)


def _describe(example):
    return f"{example['source']}: {example['question'][:60]!r}"


def align_rows(examples, rows, path):
    """For each example, the index in `rows` ((line, dict) pairs of `path`) of the row that belongs
    to it, and how they were aligned (a phrase for the log).

    By `id` when every example and every row has one; else by `(persona, question)` (by
    `question` alone when the rows carry no persona and no question repeats among the examples),
    an exact duplicate pair matched in order; by line only when neither key is on the rows and the
    files have the same length. Every example must find a row and every row an example.
    """
    examples = [_as_dict(ex, i) for i, ex in enumerate(examples)]
    if examples and all(ex.get("id") is not None for ex in examples) and all("id" in r for _, r in rows):
        method, example_keys = "id", [str(ex["id"]) for ex in examples]
        row_keys = [str(r["id"]) for _, r in rows]
    elif rows and all(isinstance(r.get("question"), str) and "persona" in r for _, r in rows):
        method = "persona and question"
        example_keys = [(_persona_key(ex["persona"]), ex["question"]) for ex in examples]
        row_keys = [(_persona_key(r["persona"]), r["question"]) for _, r in rows]
    elif rows and all(isinstance(r.get("question"), str) for _, r in rows):
        method, example_keys = "question", [ex["question"] for ex in examples]
        row_keys = [r["question"] for _, r in rows]
        personas = {}
        for ex in examples:
            if personas.setdefault(ex["question"], _persona_key(ex["persona"])) != _persona_key(ex["persona"]):
                raise UserError(
                    f"{path}: rows have no 'persona' field and the evaluation set asks {_describe(ex)} of "
                    "several personas; add 'persona' (or 'id') fields to align them"
                )
    else:
        if len(rows) != len(examples):
            raise UserError(
                f"{path}: {len(rows)} rows for {len(examples)} evaluation questions, and the rows have no "
                "'id', 'persona' or 'question' fields to align them by"
            )
        return list(range(len(rows))), "by line (same length; the rows have no id, persona or question fields)"
    pending = {}
    for i, key in enumerate(row_keys):
        pending.setdefault(key, []).append(i)
    order, missing = [], []
    for j, key in enumerate(example_keys):
        queue = pending.get(key)
        if queue:
            order.append(queue.pop(0))
        else:
            missing.append(j)
    if missing:
        raise UserError(
            f"{path}: no row for {len(missing)} of {len(examples)} evaluation questions (aligned by {method}), "
            f"the first {_describe(examples[missing[0]])}"
        )
    unused = sorted(i for queue in pending.values() for i in queue)
    if unused:
        raise UserError(
            f"{path}:{rows[unused[0]][0]}: {len(unused)} rows match no evaluation question (aligned by "
            f"{method}; an exact duplicate needs a duplicate in the evaluation set too)"
        )
    if order == list(range(len(rows))):
        return order, f"by line (same length and order, checked by {method})"
    return order, f"by {method}"


def read_responses(path, examples, what="responses file"):
    """The `response` of every row of a JSONL file, aligned with `examples` by `align_rows`."""
    from cpe_jax.data.jsonl import read_jsonl
    from cpe_jax.data.personafeedback import require_field

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{what} does not exist: {path}")
    rows = list(read_jsonl(path, what))
    if not rows:
        raise UserError(f"{what} {path} has no rows")
    texts = [require_field(row, "response", str, f"{path}:{lineno}") for lineno, row in rows]
    order, method = align_rows(examples, rows, path)
    log.info("%s: %d responses aligned to the evaluation set %s", path, len(order), method)
    return [texts[i] for i in order]


def apply_labels(examples, path):
    """`examples` with `tier` / `category` from a JSONL file of rows {persona, question, tier,
    category} (or {id, tier, category}), aligned by `align_rows`. A label that contradicts one the
    evaluation set already has is an error."""
    from cpe_jax.data.jsonl import read_jsonl
    from cpe_jax.data.personafeedback import optional_label

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"labels file does not exist: {path}")
    rows = list(read_jsonl(path, "labels file"))
    if not rows:
        raise UserError(f"labels file {path} has no rows")
    labels = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        found = {name: optional_label(row, name, where) for name in ("tier", "category")}
        if all(v is None for v in found.values()):
            raise UserError(f"{where}: a label row needs a 'tier' or a 'category' field")
        labels.append(found)
    order, method = align_rows(examples, rows, path)
    log.info("%s: labels aligned to the evaluation set %s", path, method)
    out = []
    for i, (ex, k) in enumerate(zip(examples, order)):
        ex = _as_dict(ex, i)
        for name, value in labels[k].items():
            if value is None:
                continue
            if ex.get(name) not in (None, value):
                raise UserError(f"{path}:{rows[k][0]}: {name} {value!r} contradicts {ex['source']}, "
                                f"which says {ex[name]!r}")
            ex[name] = value
        out.append(ex)
    return out


# ----------------------------------------------------------------------------------------------
# Resumable JSONL logs


def read_keyed_rows(path, keys):
    """{key: row} of a log written by this module; a torn last line (interrupted write) is dropped."""
    rows = {}
    for lineno, row in read_finished_rows(path, lambda row: isinstance(row, dict) and "key" in row,
                                          "bad JSON; delete the file to start this evaluation over"):
        if row["key"] not in keys:
            raise UserError(
                f"{path}:{lineno}: row {row['key']!r} belongs to another evaluation set; use another output "
                "directory or pass --fresh"
            )
        rows[row["key"]] = row
    return rows


def _check_run(out_dir, run, fresh):
    """Write run.json, or refuse to resume a directory written with other settings."""
    from cpe_jax.sharding import hosts_meet, is_primary, write_atomically

    path = os.path.join(out_dir, RUN_FILE)
    if fresh:
        if is_primary():  # in a multi-host job process 0 owns the output directory
            for name in (ANNOTATIONS_FILE, GENERATED_FILE, ERRORS_FILE, RUN_FILE):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
        hosts_meet("cpe_jax.eval: --fresh output directory emptied")  # then the others read it
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):  # damaged: compared as "other settings"
            previous = None
        if previous != run:
            fields = sorted(k for k in set(run) | set(previous or {}) if (previous or {}).get(k) != run.get(k))
            raise UserError(
                f"{out_dir} holds an evaluation with other settings ({', '.join(fields)} differ); "
                "use another output directory or pass --fresh"
            )
    write_atomically(path, json.dumps(run, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# Generation and judging


def policy_conversation(example, policy_prompt="paper", language="en"):
    """The chat prompt the policy answers: the paper's template or PersonaWorld's short one."""
    if policy_prompt == "paper":
        from cpe_jax.data.prompts import policy_messages

        return policy_messages(example["persona"], example["question"], language=language)
    if policy_prompt == "persona_world":
        from cpe_jax.data import persona_world

        return persona_world.policy_messages(example["persona"], example["question"])
    raise UserError(f"policy_prompt must be one of {POLICY_PROMPTS}, got {policy_prompt!r}")


def _generate(sampler, examples, sampling, policy_prompt, language):
    """Texts and finish reasons of the sampler's answers to `examples` (index, example pairs)."""
    from cpe_jax.tokenizer import apply_chat_template

    if sampler.tokenizer is None:
        raise UserError("the policy has no tokenizer (tokenizer.json or vocab.json + merges.txt) in its directory")
    limit = sampler.prompt_limit(sampling)
    prompts = []
    for _, ex in examples:
        ids = apply_chat_template(sampler.tokenizer, policy_conversation(ex, policy_prompt, language))
        if len(ids) > limit:
            raise UserError(
                f"{ex['source']}: the policy prompt has {len(ids)} tokens, more than the {limit} that fit "
                "(the model's max positions minus --max-tokens)"
            )
        prompts.append(ids)
    outputs = sampler.generate(prompts, sampling, spread_over_hosts=True)
    return [(o.text, o.finish_reason) for o in outputs]


class _RecordingJudge:
    """Pass calls through to a judge and keep its replies, to count unparseable ones per example."""

    def __init__(self, judge):
        self.judge = judge
        self.replies = []

    def __call__(self, conversations, **kwargs):
        replies = list(self.judge(conversations, **kwargs))
        self.replies += replies
        return replies


def _unparseable(reply):
    return prob_first_from_logprobs(reply.first_token_logprobs) is None and parse_verdict(reply.text) is None


def judge_name(judge):
    """A stable name for a judge: its `name`, its Python function, or its repr without an address."""
    if getattr(judge, "name", None):
        return str(judge.name)
    fn = getattr(judge, "fn", None)
    if fn is not None:
        return f"python:{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
    text = repr(judge)
    return type(judge).__name__ if " at 0x" in text else text


def _sampling_settings(sampling):
    return {k: getattr(sampling, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "seed")}


def evaluate(
    eval_examples,
    out_dir,
    *,
    judge,
    policy=None,
    responses=None,
    baseline=None,
    sampling=None,
    policy_prompt="paper",
    language="en",
    batch_size=16,
    judge_max_tokens=32,
    judge_label=None,
    policy_label=None,
    baseline_label=None,
    fresh=False,
    progress=None,
    skip_row_errors=True,
    max_consecutive_failures=DEFAULT_MAX_CONSECUTIVE_FAILURES,
    allow_partial=False,
):
    """Judge a policy's (or given) responses against a baseline; write the report; return metrics.

    eval_examples: `EvalExample`s (`personafeedback.load_eval_set`) or dicts with `question`,
      `persona` and, unless `baseline` is given, `response` (the baseline's); `tier` and
      `category` are optional and give per-group rows in the report.
    judge: a ChatJudge (`reward.judges`); both presentation orders are judged.
    policy: a `Sampler` (or a model directory) to generate responses with `sampling`
      (default: greedy, 1024 new tokens), prompted by `policy_prompt` ("paper" or "persona_world").
    responses: instead of a policy, one response text per example (e.g. `read_responses(...)`).
    baseline: one text per example; default the examples' `response`.
    batch_size: examples generated and judged per chunk; each chunk's rows are saved at once.
    fresh: discard what an earlier run left in `out_dir` instead of resuming it.
    skip_row_errors / max_consecutive_failures / allow_partial: see the module docstring.
    The labels name the judge, policy and baseline in run.json and the report.

    Returns the metrics written to metrics.json: `summarize`'s overall / by_tier / by_category
    entries (rates in percent, lengths in characters) plus judge, n and n_unparseable.
    """
    from cpe_jax.sampling import Sampler, SamplingParams

    examples = [_as_dict(ex, i) for i, ex in enumerate(eval_examples)]
    if not examples:
        raise UserError("the evaluation set is empty")
    if (policy is None) == (responses is None):
        raise UserError("give exactly one of a policy to generate responses or the responses themselves")
    if policy_prompt not in POLICY_PROMPTS:
        raise UserError(f"policy_prompt must be one of {POLICY_PROMPTS}, got {policy_prompt!r}")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    for name, texts in (("responses", responses), ("baseline", baseline)):
        if texts is not None and len(texts) != len(examples):
            raise UserError(f"{name} has {len(texts)} entries for {len(examples)} evaluation examples")
    if baseline is None:
        missing = [ex["source"] for ex in examples if not isinstance(ex["response"], str)]
        if missing:
            raise UserError(f"{missing[0]}: no baseline 'response' (and no separate baseline responses given)")
        baseline = [ex["response"] for ex in examples]
    if policy is not None and not isinstance(policy, Sampler):
        policy = Sampler.from_pretrained(policy, max_batch_size=batch_size)
    sampling = sampling or SamplingParams(max_tokens=DEFAULT_MAX_TOKENS, temperature=0.0)
    if sampling.n != 1:
        raise UserError(f"evaluation samples one response per question, got n={sampling.n}")

    os.makedirs(out_dir, exist_ok=True)
    name = judge_label or judge_name(judge)
    run = {
        "judge": name,
        "policy": policy_label or ("policy" if policy is not None else "responses"),
        "baseline": baseline_label or "eval set responses",
        "language": language,
        "judge_max_tokens": judge_max_tokens,
    }
    if policy is not None:
        run["policy_prompt"] = policy_prompt
        run["sampling"] = _sampling_settings(sampling)
    _check_run(out_dir, run, fresh)

    keys = [example_key(i, ex["question"]) for i, ex in enumerate(examples)]
    annotations_path = os.path.join(out_dir, ANNOTATIONS_FILE)
    done = read_keyed_rows(annotations_path, set(keys))
    for key, row in done.items():
        i = row["index"]
        given = {"baseline_response": baseline[i]}
        if responses is not None:
            given["model_response"] = responses[i]
        for field, text in given.items():
            if row.get(field) != text:
                raise UserError(
                    f"{annotations_path}: row {key} has another {field} than this run; use another "
                    "output directory or pass --fresh"
                )
    generated_path = os.path.join(out_dir, GENERATED_FILE)
    generated = read_keyed_rows(generated_path, set(keys)) if policy is not None else {}

    errors = RowErrorLog(os.path.join(out_dir, ERRORS_FILE), skip=skip_row_errors)
    streak = FailureStreak(max_consecutive_failures)
    pending = [i for i, key in enumerate(keys) if key not in done and key not in errors]
    if pending:
        log.info("evaluating %d of %d examples (%d already done)", len(pending), len(examples), len(done))
    chunks = [pending[s : s + batch_size] for s in range(0, len(pending), batch_size)]
    if progress is None:
        progress = sys.stderr.isatty()
    if progress and chunks:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="eval", unit="chunk")
    annotations = JsonlAppender(annotations_path)
    generated_log = JsonlAppender(generated_path) if policy is not None else None
    try:
        for chunk in chunks:
            model_texts, finish = {}, {}
            if policy is None:
                model_texts = {i: responses[i] for i in chunk}
            else:
                for i in chunk:
                    if keys[i] in generated:
                        model_texts[i] = generated[keys[i]]["response"]
                        finish[i] = generated[keys[i]].get("finish_reason")
                to_generate = [(i, examples[i]) for i in chunk if i not in model_texts]
                if to_generate:
                    outputs = _generate(policy, to_generate, sampling, policy_prompt, language)
                    for (i, _), (text, reason) in zip(to_generate, outputs):
                        model_texts[i], finish[i] = text, reason
                        generated_log.write({"key": keys[i], "index": i, "response": text, "finish_reason": reason})
            recorder = _RecordingJudge(judge)
            pairs = [
                {
                    "persona": examples[i]["persona"],
                    "question": examples[i]["question"],
                    "model_response": model_texts[i],
                    "baseline_response": baseline[i],
                }
                for i in chunk
            ]
            judgement = judge_pairs(
                recorder, pairs, language=language, max_tokens=judge_max_tokens, batch_size=2 * len(chunk)
            )
            for j, i in enumerate(chunk):
                ex = examples[i]
                if judgement.outcomes[j] == NO_ANSWER:
                    continue  # stored nowhere: a rerun judges this example
                if judgement.outcomes[j] == ROW_ERROR:
                    error = next(r.error for r in recorder.replies[2 * j : 2 * j + 2] if r.outcome == ROW_ERROR)
                    where = ex["source"] + (f" (id {ex['id']!r})" if ex["id"] is not None else "")
                    errors.add(keys[i], ex["id"] if ex["id"] is not None else i, _source_line(ex["source"], i),
                               error, where)
                    continue
                row = {
                    "key": keys[i],
                    "index": i,
                    "source": ex["source"],
                    "question": ex["question"],
                    "tier": ex["tier"],
                    "category": ex["category"],
                    "model_response": model_texts[i],
                    "baseline_response": baseline[i],
                    "model_length": len(model_texts[i]),
                    "baseline_length": len(baseline[i]),
                    "preference": judgement.preferences[j],
                    "model_first": judgement.model_first[j],
                    "model_second": judgement.model_second[j],
                    "judge_replies": judgement.replies[2 * j : 2 * j + 2],
                    "n_unparseable": sum(_unparseable(r) for r in recorder.replies[2 * j : 2 * j + 2]),
                }
                if policy is not None:
                    row["finish_reason"] = finish.get(i)
                annotations.write(row)
                done[keys[i]] = row
            if streak.update([r.outcome for r in recorder.replies], [r.error for r in recorder.replies]):
                break  # the judge is down: stop at once, keep what is finished
            if not progress:
                log.info("judged %d / %d examples", len(done), len(examples))
    finally:
        annotations.close()
        if generated_log is not None:
            generated_log.close()

    unjudged = sum(1 for key in keys if key not in done and key not in errors)
    rows = sorted(done.values(), key=lambda r: r["index"])
    counts = {"judged": len(rows), "unjudged": unjudged, "row_errors": len(errors)}
    head = {
        "judge": name,
        "policy": run["policy"],
        "baseline": run["baseline"],
        **({"policy_prompt": policy_prompt} if policy is not None else {}),
        **counts,
    }
    if unjudged == 0:
        if [r["key"] for r in rows] != list(done):  # resumed out of order: same file as an unbroken run
            write_jsonl_atomic(annotations_path, rows)
        errors.finish(keys)
    if rows and (unjudged == 0 or allow_partial):
        metrics = {
            **head,
            "n": len(rows),
            "n_unparseable": int(sum(r["n_unparseable"] for r in rows)),
            "length_unit": "characters",
            **summarize(rows),
        }
        if unjudged:
            metrics["partial"] = (f"{len(rows)} of {len(examples)} examples judged, {unjudged} got no answer "
                                  "(--allow-partial): the win rate is of the judged examples only")
        if policy is not None:
            metrics["n_truncated"] = sum(1 for r in rows if r.get("finish_reason") == "length")
        write_report(out_dir, metrics, rows)
    else:
        note = ("examples are unjudged (rerun to judge them, or pass --allow-partial)" if unjudged
                else f"the judge refused every example (see {ERRORS_FILE})")
        metrics = {**head, "win_rate": None, "note": f"no win rate: {note}"}
        from cpe_jax.sharding import write_atomically

        write_atomically(os.path.join(out_dir, METRICS_FILE), json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    if unjudged:
        reason = streak.reason() if streak.tripped else f"{unjudged} examples got no answer"
        raise JudgeUnavailable(reason, done=len(rows) + len(errors), remaining=unjudged, unit="examples")
    return metrics


def _source_line(source, index):
    """The line number in an example's `source` ("file:line"), else its 1-based position."""
    tail = str(source).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else index + 1
