"""Critique-Post-Edit on Qwen2.5-14B-Instruct with the paper's defaults (random edits, r = 0.5).

The preset ships with the package as cpe_jax/configs/cpe_qwen2_5_14b.py (the one copy to edit); this file
re-exports it so that `--config=configs/cpe_qwen2_5_14b.py` works from a checkout.
"""

from cpe_jax.configs.cpe_qwen2_5_14b import get_config  # noqa: F401
