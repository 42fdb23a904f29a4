"""Critique-Post-Edit on Qwen2.5-14B-Instruct on a v4-128 slice (64 chips), paper defaults.

The preset ships with the package as cpe_jax/configs/cpe_qwen2_5_14b_v4_128.py (the one copy to edit); this file
re-exports it so that `--config=configs/cpe_qwen2_5_14b_v4_128.py` works from a checkout.
"""

from cpe_jax.configs.cpe_qwen2_5_14b_v4_128 import get_config  # noqa: F401
