"""RL stage of `cpe-jax demo`: PPO / CPE on PersonaWorld prompts with a distilled flax GRM.

The preset ships with the package as cpe_jax/configs/demo_rl.py (the one copy to edit); this file
re-exports it so that `--config=configs/demo_rl.py` works from a checkout.
"""

from cpe_jax.configs.demo_rl import get_config  # noqa: F401
