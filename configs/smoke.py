"""Seconds-per-step CPU config for tests: a tiny policy, PersonaWorld prompts, the Python teacher as GRM.

The preset ships with the package as cpe_jax/configs/smoke.py (the one copy to edit); this file
re-exports it so that `--config=configs/smoke.py` works from a checkout.
"""

from cpe_jax.configs.smoke import get_config  # noqa: F401
