"""DPO baseline for Qwen2.5-7B-Instruct on PersonaFeedback-style pairs (the paper's DPO row).

The preset ships with the package as cpe_jax/configs/dpo_qwen2_5_7b.py (the one copy to edit); this file
re-exports it so that `--config=configs/dpo_qwen2_5_7b.py` works from a checkout.
"""

from cpe_jax.configs.dpo_qwen2_5_7b import get_config  # noqa: F401
