"""MiCoTA recipe at paper scale: a Qwen2.5-7B-size teacher assistant distills chain of thought into

The preset ships with the package as cpe_jax/configs/micota_qwen2_5_1_5b.py (the one copy to edit); this file
re-exports it so that `--config=configs/micota_qwen2_5_1_5b.py` works from a checkout.
"""

from cpe_jax.configs.micota_qwen2_5_1_5b import get_config  # noqa: F401
