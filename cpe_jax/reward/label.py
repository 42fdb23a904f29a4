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
"""

import json
import logging
import os

from cpe_jax.data.prompts import grm_messages
from cpe_jax.data.jsonl import read_jsonl
from cpe_jax.errors import UserError, require_path
from cpe_jax.reward.grm import parse_grm_output

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


def _finished_rows(out_path):
    """Keys of the rows already in OUT; a broken LAST line (interrupted write) is cut off."""
    if not os.path.exists(out_path):
        return {}
    with open(out_path, encoding="utf-8") as f:
        lines = f.readlines()
    done, good = {}, []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            ok = line.endswith("\n") and isinstance(row, dict) and "line" in row
        except json.JSONDecodeError:
            ok = False
        if not ok:
            if i == len(lines) - 1:
                log.warning("%s: dropping an unfinished last line; its row is labelled again", out_path)
                break
            raise UserError(f"{out_path}:{i + 1}: not a row written by `cpe-jax label` (fix or move the file)")
        done[row_key(row, row["line"])] = row
        good.append(line)
    if len(good) != len(lines):
        tmp = f"{out_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(good)
        os.replace(tmp, out_path)
    return done


def label(judge, in_path, out_path, *, language="en", temperature=0.0, max_tokens=1024, batch_size=16,
          progress=False):
    """Judge every row of `in_path` not yet in `out_path` with `judge` (a ChatJudge) and append.

    Returns counts: rows, already_done, labelled (this run), invalid (in the whole OUT file).
    """
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be >= 1")
    rows = read_label_rows(in_path)
    done = _finished_rows(out_path)
    todo = [r for r in rows if r[0] not in done]
    already = len(rows) - len(todo)
    invalid = sum(1 for key, _, _ in rows if key in done and not done[key].get("valid", False))
    chunks = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="label", unit="batch")
    labelled = 0
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as out:
        for chunk in chunks:
            prompts = [grm_messages(row["persona"], row["question"], row["response"], language) for _, _, row in chunk]
            replies = judge(prompts, temperature=temperature, max_tokens=max_tokens)
            if len(replies) != len(prompts):
                raise RuntimeError(f"judge returned {len(replies)} replies for {len(prompts)} conversations")
            for (_, line_no, row), messages, reply in zip(chunk, prompts, replies):
                judgement = parse_grm_output(reply.text)
                record = dict(row)
                record.update(
                    line=line_no,
                    messages=messages + [{"role": "assistant", "content": reply.text}],
                    valid=judgement.valid,
                    problem=judgement.problem,
                )
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                invalid += not judgement.valid
            out.flush()
            os.fsync(out.fileno())
            labelled += len(chunk)
            if not progress:
                log.info("labelled %d / %d rows", already + labelled, len(rows))
    return {"rows": len(rows), "already_done": already, "labelled": labelled, "invalid": invalid}


def add_judge_arguments(parser, *, required=True):
    """The `--judge {python,http,flax}` flags shared by `cpe-jax label` and `cpe-jax rm-eval`."""
    parser.add_argument("--judge", required=required, choices=["python", "http", "flax"])
    parser.add_argument("--judge-fn", metavar="MODULE:FUNCTION",
                        help="--judge python: fn(messages) -> str, importable from PYTHONPATH")
    parser.add_argument("--base-url", help="--judge http: OpenAI-compatible server, e.g. http://localhost:8000/v1")
    parser.add_argument("--judge-model", "--model", dest="judge_model", metavar="NAME",
                        help="--judge http: model name on the server")
    parser.add_argument("--api-key-env", metavar="VAR", help="--judge http: environment variable holding the "
                        "API key (default OPENAI_API_KEY; '' for a server without a key)")
    parser.add_argument("--judge-path", metavar="DIR", help="--judge flax: judge model directory")
    parser.add_argument("--max-concurrency", type=int, default=8, help="--judge http: requests in flight")


def judge_from_arguments(args, judge_path=None):
    """(ChatJudge, label) from the flags of `add_judge_arguments`."""
    from cpe_jax.eval.run import build_judge

    return build_judge(args.judge, judge_fn=args.judge_fn, base_url=args.base_url, judge_model=args.judge_model,
                       api_key_env=args.api_key_env, judge_path=judge_path or args.judge_path,
                       max_concurrency=args.max_concurrency)
