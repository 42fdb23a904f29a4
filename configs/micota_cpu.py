"""MiCoTA teacher-assistant CoT distillation on the synthetic arithmetic task; tiny CPU defaults.

The preset ships with the package as cpe_jax/configs/micota_cpu.py (the one copy to edit); this file
re-exports it so that `--config=configs/micota_cpu.py` works from a checkout.
"""

from cpe_jax.configs.micota_cpu import get_config  # noqa: F401
