"""JSON Lines: every reader of user files goes through here so errors name FILE:LINE, and the
one way outputs are written: whole files atomically (`write_jsonl_atomic`), resumable outputs by
appending (`JsonlAppender`) and reading back what a previous run finished (`read_finished_rows`).

Files are opened in binary and each line is decoded inside the error handling, so one byte that
is not UTF-8 is a `FILE:LINE: not UTF-8 text` UserError (exit code 2), never a traceback.
Cloud paths (gs://...) are opened through etils.epath, as Orbax reads them.
"""

import json
import logging
import os

from cpe_jax.errors import UserError

log = logging.getLogger(__name__)


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


def write_jsonl_atomic(path, rows):
    """Write `rows` as JSONL through PATH.tmp and a rename: the file is whole or untouched. In a
    multi-host job only process 0 writes (every host holds the same rows)."""
    from cpe_jax.sharding import write_atomically

    write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_finished_rows(path, is_row, bad_row):
    """[(line_number, row)] of a resumable output: what earlier runs of a command appended to `path`.

    A torn last line (the write an interruption cut: no newline at its end, and not a whole row) is
    dropped from the file, so that row is done again. Any other line that is not a row (bad UTF-8 or
    JSON, or `is_row(obj)` false) is the UserError `PATH:LINE: <bad_row>`. A missing file has no rows.
    """
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        raw_lines = f.readlines()
    rows = []
    for line_no, raw in enumerate(raw_lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            ok = is_row(row)
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if ok:
            rows.append((line_no, row))
            continue
        if line_no == len(raw_lines) and not raw.endswith(b"\n"):
            log.warning("%s:%d: dropping a partly written last line; its row is done again", path, line_no)
            write_jsonl_atomic(path, [row for _, row in rows])
            break
        raise UserError(f"{path}:{line_no}: {bad_row}")
    return rows


class JsonlAppender:
    """Appends rows to a resumable output, each flushed (and with `fsync`, synced to disk) as it is
    written, so an interruption loses nothing finished. Use as a context manager or `close()`.
    In a multi-host job only process 0 opens the file; on the other hosts writes do nothing."""

    def __init__(self, path, *, fsync=False):
        from cpe_jax.sharding import is_primary

        self.path, self.fsync = path, fsync
        self.file = None
        if is_primary():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")

    def write(self, *rows):
        if self.file is None:
            return
        for row in rows:
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.flush()

    def flush(self):
        if self.file is None:
            return
        self.file.flush()
        if self.fsync:
            os.fsync(self.file.fileno())

    def close(self):
        if self.file is not None:
            self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
