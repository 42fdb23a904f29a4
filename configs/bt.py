"""Bradley-Terry reward model on preference pairs; defaults for a small CPU run.

The preset ships with the package as cpe_jax/configs/bt.py (the one copy to edit); this file
re-exports it so that `--config=configs/bt.py` works from a checkout.
"""

from cpe_jax.configs.bt import get_config  # noqa: F401
