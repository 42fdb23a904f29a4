"""User mistakes end with exit code 2 and one line naming the culprit; a judge that stopped answering
ends with exit code 3 and one line saying what is done and how to resume; tracebacks are for our bugs."""

import functools
import sys


class UserError(Exception):
    """A problem with the user's input (path, data row, config field, shape), not a bug."""


class JudgeUnavailable(Exception):
    """The judge gave no answer (connection refused or reset, timeout, 429/5xx after the retry budget,
    an empty reply) often enough that the command stopped; what was finished is kept.

    `done` and `remaining` count the command's units (`unit`: rows, pairs, steps); `resume` is the
    command line that picks up where this one stopped (set by the CLI, which knows its arguments).
    """

    def __init__(self, reason, *, done, remaining, unit="rows"):
        super().__init__(reason)
        self.reason, self.done, self.remaining, self.unit = reason, int(done), int(remaining), unit
        self.resume = None

    def __str__(self):
        text = f"judge unavailable: {self.reason}; {self.done} {self.unit} done, {self.remaining} remaining"
        return text + (f"; resume with: {self.resume}" if self.resume else "")


def exit_on_user_error(fn):
    """Run `fn`; turn a UserError into one line on stderr and exit code 2, a JudgeUnavailable into
    one line and exit code 3."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"cpe-jax: error: {e}", file=sys.stderr)
            sys.exit(2)
        except JudgeUnavailable as e:
            print(f"cpe-jax: {e}", file=sys.stderr)
            sys.exit(3)

    return wrapper


def require_path(path, what="path"):
    """Return `path` as a string, or raise a UserError naming it when it does not exist.

    Cloud paths (gs://...) are checked through etils.epath, as Orbax reads them.
    """
    import os

    path = os.fspath(path)
    if "://" in path:
        from etils import epath

        exists = epath.Path(path).exists()
    else:
        exists = os.path.exists(path)
    if not exists:
        raise UserError(f"{what} does not exist: {path}")
    return path
