"""SFT of the policy or GRM distillation (mode `lm`); defaults for a small CPU run.

The preset ships with the package as cpe_jax/configs/sft.py (the one copy to edit); this file
re-exports it so that `--config=configs/sft.py` works from a checkout.
"""

from cpe_jax.configs.sft import get_config  # noqa: F401
