"""Critique-Post-Edit on Qwen2.5-14B-Instruct on a v5p-64 slice (32 chips), paper defaults.

The preset ships with the package as cpe_jax/configs/cpe_qwen2_5_14b_v5p64.py (the one copy to edit); this file
re-exports it so that `--config=configs/cpe_qwen2_5_14b_v5p64.py` works from a checkout.
"""

from cpe_jax.configs.cpe_qwen2_5_14b_v5p64 import get_config  # noqa: F401
