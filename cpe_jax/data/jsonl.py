"""JSON Lines input: every reader of user files goes through here so errors name FILE:LINE.

Files are opened in binary and each line is decoded inside the error handling, so one byte that
is not UTF-8 is a `FILE:LINE: not UTF-8 text` UserError (exit code 2), never a traceback.
Cloud paths (gs://...) are opened through etils.epath, as Orbax reads them.
"""

import json
import os

from cpe_jax.errors import UserError


def open_binary(path, what="file"):
    """`path` (local or gs://...) opened for reading bytes; a UserError naming it when that fails."""
    path = os.fspath(path)
    try:
        if "://" in path:
            from etils import epath

            return epath.Path(path).open("rb")
        return open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None


def decode_text(data, path, line_no=None):
    """`data` (bytes) as text; a UserError `FILE:LINE: not UTF-8 text` on a byte that is not UTF-8.

    Without `line_no` the data is a whole file and the line is counted up to the bad byte.
    A UTF-8 byte-order mark at the start of a file is dropped.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_no if line_no is not None else data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {data[e.start:e.start + 1]!r}: {e.reason})") from None
    if line_no in (None, 1) and text.startswith("\ufeff"):
        text = text[1:]
    return text


def read_jsonl(path, what="file"):
    """Yield (line_number, object) for every non-blank line of `path` (local or gs://...).

    A missing or unreadable file, a line that is not UTF-8, bad JSON, or a line that is not a JSON
    object is a UserError naming the file (and line), which the CLI turns into exit code 2.
    """
    path = os.fspath(path)
    with open_binary(path, what) as f:
        for line_no, raw in enumerate(f, start=1):
            line = decode_text(raw, path, line_no)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: bad JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row
