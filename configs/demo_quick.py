"""`cpe-jax demo --quick`: the same pipeline as configs/demo_cpu.py, shrunk to a few minutes on a CPU.

The preset ships with the package as cpe_jax/configs/demo_quick.py (the one copy to edit); this file
re-exports it so that `--config=configs/demo_quick.py` works from a checkout.
"""

from cpe_jax.configs.demo_quick import get_config  # noqa: F401
