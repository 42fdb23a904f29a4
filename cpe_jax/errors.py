"""User mistakes end with exit code 2 and one line naming the culprit; tracebacks are for our bugs."""

import functools
import sys


class UserError(Exception):
    """A problem with the user's input (path, data row, config field, shape), not a bug."""


def exit_on_user_error(fn):
    """Run `fn`; turn a UserError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"cpe-jax: error: {e}", file=sys.stderr)
            sys.exit(2)

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
