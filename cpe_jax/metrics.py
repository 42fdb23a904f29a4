"""Training metrics: `workdir/metrics.jsonl` (one object per step) and TensorBoard, plus progress display.

Only process 0 writes. Every line is flushed as it is written, so a crash loses nothing; a run
resumed from step k first drops the lines of steps after k, so the file never holds a step twice.
"""

import json
import logging
import math
import os
import sys
import time

log = logging.getLogger(__name__)


def _scalar(value):
    """A JSON-friendly float/int, or None for values that are not scalars."""
    try:
        import numpy as np

        value = np.asarray(value)
        if value.size != 1:
            return None
        value = value.item()
    except (TypeError, ValueError):
        return None
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, (int, float)) else None


class MetricsWriter:
    """Append `{"step": k, **scalars}` to metrics.jsonl and the same scalars to TensorBoard (`workdir/tb`).

    `workdir` may be local or a cloud path (gs://...): object stores cannot append, so there the
    whole (small) file is rewritten after every step.
    """

    def __init__(self, workdir, *, resume_step=None, tensorboard=True):
        import jax
        from etils import epath

        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._remote = "://" in str(workdir)
        self._file = self._tb = None
        self._lines = []
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step or 0)
        if not self._remote:
            self._file = open(self.path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(epath.Path(workdir) / "tb"), purge_step=(resume_step or 0) + 1)
            except Exception as e:  # a storage backend tensorboardX cannot write: keep metrics.jsonl
                log.warning("TensorBoard disabled for %s: %s", workdir, e)

    def _truncate_after(self, step):
        """Keep only lines of steps <= `step` (a resumed run rewrites the steps after it)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
        self._lines = kept
        if self._remote:
            self.path.write_text("".join(kept))
            return
        tmp = str(self.path) + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step, metrics):
        """Record the scalars of one step (non-scalar values are skipped; NaN is written as null)."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        for name, value in metrics.items():
            value = _scalar(value)
            if value is None:
                continue
            row[name] = None if isinstance(value, float) and not math.isfinite(value) else value
            if self._tb is not None:
                self._tb.add_scalar(name, value, int(step))
        line = json.dumps(row) + "\n"
        if self._remote:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        else:
            self._file.write(line)
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir):
    """The rows of `workdir/metrics.jsonl`, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class _LogProgress:
    """tqdm's interface for non-terminal output: a plain log line every `every` seconds and at the end."""

    def __init__(self, total, initial, desc, every=30.0):
        self.total, self.n, self.desc, self.every = total, initial, desc, every
        self.postfix = ""
        self._last = time.monotonic()

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every or (self.total and self.n >= self.total):
            self._last = now
            log.info("%s: %d/%s %s", self.desc, self.n, self.total or "?", self.postfix)

    def set_postfix(self, **values):
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self):
        pass


class _NoProgress(_LogProgress):
    def update(self, n=1):
        self.n += n


def progress_bar(total=None, initial=0, desc="", enabled=True):
    """A tqdm bar on a terminal, periodic log lines otherwise; `enabled=False` shows nothing."""
    if not enabled:
        return _NoProgress(total, initial, desc)
    try:
        import jax

        if jax.process_index() != 0:
            return _NoProgress(total, initial, desc)
    except ImportError:
        pass
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
    return _LogProgress(total, initial, desc)
