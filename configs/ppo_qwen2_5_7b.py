"""Plain PPO (no edits) on Qwen2.5-7B-Instruct, the baseline of the ablation table.

The preset ships with the package as cpe_jax/configs/ppo_qwen2_5_7b.py (the one copy to edit); this file
re-exports it so that `--config=configs/ppo_qwen2_5_7b.py` works from a checkout.
"""

from cpe_jax.configs.ppo_qwen2_5_7b import get_config  # noqa: F401
