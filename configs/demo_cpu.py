"""`cpe-jax demo`: the paper's pipeline in miniature on PersonaWorld, sized for a 2-core CPU (~10 min).

The preset ships with the package as cpe_jax/configs/demo_cpu.py (the one copy to edit); this file
re-exports it so that `--config=configs/demo_cpu.py` works from a checkout.
"""

from cpe_jax.configs.demo_cpu import get_config  # noqa: F401
