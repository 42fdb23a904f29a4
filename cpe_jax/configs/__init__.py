"""The presets shipped with the package: `cpe-jax demo` reads its stage configs from here, and
every file is also a `--config=` target (configs/ at the repository root re-exports them)."""

import os

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def config_path(name):
    """The file of the shipped preset `name` (e.g. "sft.py"), for `--config=`."""
    return os.path.join(CONFIG_DIR, name)
