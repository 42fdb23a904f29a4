"""Critique-Post-Edit on Qwen2.5-7B-Instruct on a v5litepod-64 slice (64 chips), paper defaults.

The preset ships with the package as cpe_jax/configs/cpe_qwen2_5_7b_v5e64.py (the one copy to edit); this file
re-exports it so that `--config=configs/cpe_qwen2_5_7b_v5e64.py` works from a checkout.
"""

from cpe_jax.configs.cpe_qwen2_5_7b_v5e64 import get_config  # noqa: F401
