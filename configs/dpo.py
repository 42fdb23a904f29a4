"""DPO / IPO on preference pairs; defaults for a small CPU run.

The preset ships with the package as cpe_jax/configs/dpo.py (the one copy to edit); this file
re-exports it so that `--config=configs/dpo.py` works from a checkout.
"""

from cpe_jax.configs.dpo import get_config  # noqa: F401
