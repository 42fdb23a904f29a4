"""JSON Lines input: every reader of user files goes through here so errors name FILE:LINE."""

import json

from cpe_jax.errors import UserError


def read_jsonl(path, what="file"):
    """Yield (line_number, object) for every non-blank line of `path`.

    A missing or unreadable file, bad JSON, or a line that is not a JSON object is a UserError
    naming the file (and line), which the CLI turns into exit code 2.
    """
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    with f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: bad JSON: {e.msg} (column {e.colno})") from None
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{line_no}: not UTF-8 text ({e.reason})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row
