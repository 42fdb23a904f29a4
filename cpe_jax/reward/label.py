"""GRM distillation data: a teacher judge's judgements of (persona, question, response) rows.

`cpe-jax label` reads rows `{persona, question, response, ...}` and writes one row per input:

    {...input fields, "line": N, "messages": GRM prompt + [assistant: teacher output],
     "valid": bool, "problem": str}

`messages` is exactly what the GRM is distilled on (the assistant turn is the target). Rows whose
teacher output cannot be parsed are kept with `valid: false` (and counted), so a rerun does not
ask the teacher again and the failures can be inspected; the distillation must skip them (train
only on rows with `valid: true`), otherwise the student learns to write unreadable judgements.

Resumable: an input row is identified by its `id` field when it has one, else by its line number;
rows already in OUT are kept and skipped. Finished rows are appended and flushed batch by batch,
so an interruption loses at most the batch in flight; a half-written last line (a crash mid-write)
is dropped on resume and that row is judged again.

A judge call that gets no answer (server down, timeout, 429/5xx after the retries, empty reply) is
stored nowhere: a rerun judges that row. After `max_consecutive_failures` of them in a row the
command stops at once (JudgeUnavailable, exit code 3). A row the server refuses (HTTP 400/413/422,
e.g. longer than its context) goes to `OUT.errors.jsonl` (`errors_path`) with its id, line and the
server's message, and is skipped (or stops the command with `skip_row_errors=False`). When every
row is finished, OUT is rewritten in input order, so a run interrupted and resumed leaves the same
file as one that never stopped.
"""

import logging
import os

from cpe_jax.data.prompts import check_grm_style, grm_messages
from cpe_jax.data.jsonl import JsonlAppender, read_finished_rows, read_jsonl, write_jsonl_atomic
from cpe_jax.errors import JudgeUnavailable, UserError, require_path
from cpe_jax.reward.grm import parse_grm_output
from cpe_jax.reward.judges import DEFAULT_MAX_CONSECUTIVE_FAILURES, NO_ANSWER, ROW_ERROR, FailureStreak, RowErrorLog

log = logging.getLogger(__name__)

_TEXT_FIELDS = ("question", "response")


def read_label_rows(path):
    """[(key, line number, row)] of a JSONL file of {persona, question, response}; UserError at
    the first malformed row, naming file:line. The key is the row's `id`, else its line number."""
    require_path(path, "input file")
    out, seen = [], {}
    for line_no, row in read_jsonl(path, "input file"):
        where = f"{path}:{line_no}"
        for name in _TEXT_FIELDS:
            if not isinstance(row.get(name), str):
                raise UserError(f"{where}: field {name!r} must be a string")
        if not isinstance(row.get("persona"), (str, dict)):
            raise UserError(f"{where}: field 'persona' must be a string or an object")
        key = row_key(row, line_no)
        if key in seen:
            raise UserError(f"{where}: id {row['id']!r} already used on line {seen[key]}")
        seen[key] = line_no
        out.append((key, line_no, row))
    if not out:
        raise UserError(f"{path}: no rows")
    return out


def row_key(row, line_no):
    return f"id:{row['id']}" if "id" in row else f"line:{line_no}"


def finished_rows(out_path):
    """{key: row} of the rows already in OUT (a torn last line is cut off and labelled again)."""
    rows = read_finished_rows(out_path, lambda row: isinstance(row, dict) and "line" in row,
                              "not a row written by `cpe-jax label` (fix or move the file)")
    return {row_key(row, row["line"]): row for _, row in rows}


def errors_path(out_path):
    """Where `label` records the rows the judge refused: OUT without .jsonl, plus .errors.jsonl."""
    root, ext = os.path.splitext(out_path)
    return (root if ext == ".jsonl" else out_path) + ".errors.jsonl"


def describe_row(path, line_no, row):
    """How messages name an input row: file:line and its id when it has one."""
    return f"{path}:{line_no}" + (f" (id {row['id']!r})" if "id" in row else "")


def label(judge, in_path, out_path, *, language="en", temperature=0.0, max_tokens=1024, batch_size=16,
          progress=False, skip_row_errors=True, max_consecutive_failures=DEFAULT_MAX_CONSECUTIVE_FAILURES,
          prompt_style="full"):
    """Judge every row of `in_path` not yet in `out_path` (nor in its errors file) and append; the
    GRM prompt is rendered in `prompt_style` (`prompts.GRM_STYLES`), as the GRM will be judged with.

    Returns counts: rows, already_done, labelled (this run), invalid (in the whole OUT file),
    judged (rows in OUT), row_errors (rows in the errors file). Raises JudgeUnavailable (after
    keeping every finished row; done = judged + refused rows) when rows got no answer.
    """
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    check_grm_style(prompt_style)
    rows = read_label_rows(in_path)
    done = finished_rows(out_path)
    errors = RowErrorLog(errors_path(out_path), skip=skip_row_errors)
    streak = FailureStreak(max_consecutive_failures)
    todo = [r for r in rows if r[0] not in done and r[0] not in errors]
    already = len(rows) - len(todo)
    chunks = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="label", unit="batch")
    labelled = 0

    def remaining():
        return sum(1 for key, _, _ in rows if key not in done and key not in errors)

    with JsonlAppender(out_path, fsync=True) as out:
        for chunk in chunks:
            prompts = [grm_messages(row["persona"], row["question"], row["response"], language, style=prompt_style)
                       for _, _, row in chunk]
            replies = judge(prompts, temperature=temperature, max_tokens=max_tokens)
            if len(replies) != len(prompts):
                raise RuntimeError(f"judge returned {len(replies)} replies for {len(prompts)} conversations")
            finished = []
            try:
                for (key, line_no, row), messages, reply in zip(chunk, prompts, replies):
                    if reply.outcome == NO_ANSWER:
                        continue  # stored nowhere: a rerun judges this row
                    if reply.outcome == ROW_ERROR:
                        errors.add(key, row.get("id", line_no), line_no, reply.error,
                                   describe_row(in_path, line_no, row))
                        continue
                    judgement = parse_grm_output(reply.text)
                    record = dict(row)
                    record.update(
                        line=line_no,
                        messages=messages + [{"role": "assistant", "content": reply.text}],
                        valid=judgement.valid,
                        problem=judgement.problem,
                    )
                    finished.append(record)
                    done[key] = record
                    labelled += 1
            finally:
                out.write(*finished)  # flushed and synced: an interruption loses at most the chunk in flight
            if streak.update([r.outcome for r in replies], [r.error for r in replies]):
                raise JudgeUnavailable(streak.reason(), done=len(done) + len(errors), remaining=remaining())
            if not progress:
                log.info("labelled %d / %d rows", len(done) + len(errors), len(rows))
    left = remaining()
    if left:
        raise JudgeUnavailable(f"{left} rows got no answer", done=len(done) + len(errors), remaining=left)
    order = [key for key, _, _ in rows]
    if list(done) != [key for key in order if key in done]:
        write_jsonl_atomic(out_path, [done[key] for key in order if key in done])
    errors.finish(order)
    invalid = sum(1 for row in done.values() if not row.get("valid", False))
    return {"rows": len(rows), "already_done": already, "labelled": labelled, "invalid": invalid,
            "judged": len(done), "unjudged": 0, "row_errors": len(errors), "errors": errors}
