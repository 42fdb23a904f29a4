"""What the host CPU can do, read once from /proc/cpuinfo: the one place that decides whether
bfloat16 compute pays off on CPU, and how its matmuls run.

XLA:CPU runs a bfloat16 x bfloat16 -> float32 matmul on AMX tiles (Intel Sapphire Rapids and
later), several times faster than float32. Without AMX its bfloat16 matmuls are ~1.5x slower than
float32 ones of the same values (the AVX-512 BF16 dot instructions alone do not help), so there
the model multiplies float32 copies of bfloat16 operands (`cpu_multiplies_natively`, used by
`models.qwen2.model.dot_operands`): the same products, at float32 speed. bfloat16 is still not
the default compute dtype there (`cpu_prefers_bfloat16`): float32 is exact and about as fast.
"""

import functools
import logging

log = logging.getLogger(__name__)

CPUINFO = "/proc/cpuinfo"
REPORTED_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
BFLOAT16_MATMUL_FEATURE = "amx_bf16"


@functools.lru_cache(maxsize=None)
def cpu_flags(path: str = CPUINFO) -> frozenset:
    """The feature flags of the first CPU in `path` (empty where there is no such file, e.g. macOS)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_features(path: str = CPUINFO) -> dict:
    """{feature: present} for the features that decide CPU speed here (benchmarks print this)."""
    flags = cpu_flags(path)
    return {name: name in flags for name in REPORTED_FEATURES}


def cpu_multiplies_natively(dtype_name: str, path: str = CPUINFO) -> bool:
    """Whether XLA:CPU runs a `dtype` x `dtype` -> float32 matmul here at least as fast as a
    float32 one: float32 always, bfloat16 with AMX only. Without AMX it runs a bfloat16 matmul
    ~1.5x slower than the float32 matmul of the same values (64 x 512 x 1376 on a 2-core AMD
    EPYC with AVX2: 1.00 against 0.60 ms), and a float16 one likewise."""
    if dtype_name == "float32":
        return True
    return dtype_name == "bfloat16" and BFLOAT16_MATMUL_FEATURE in cpu_flags(path)


# Overrides the choice on every CPU (e.g. a test suite that must run the same on any machine).
CPU_DTYPE_ENV = "CPE_JAX_CPU_DTYPE"


@functools.lru_cache(maxsize=None)
def cpu_prefers_bfloat16(path: str = CPUINFO) -> bool:
    """Whether bfloat16 compute beats float32 on this CPU (AMX present, or $CPE_JAX_CPU_DTYPE
    says bfloat16), logged once."""
    import os

    forced = os.environ.get(CPU_DTYPE_ENV, "")
    if forced:
        if forced not in ("float32", "bfloat16"):
            from cpe_jax.errors import UserError

            raise UserError(f"environment variable {CPU_DTYPE_ENV}={forced!r} must be float32 or bfloat16")
        log.info("CPU compute dtype: %s ($%s)", forced, CPU_DTYPE_ENV)
        return forced == "bfloat16"
    flags = cpu_flags(path)
    choice = BFLOAT16_MATMUL_FEATURE in flags
    present = ", ".join(name for name in REPORTED_FEATURES if name in flags) or "none found"
    log.info("CPU compute dtype: %s (CPU features: %s; bfloat16 needs %s)",
             "bfloat16" if choice else "float32", present, BFLOAT16_MATMUL_FEATURE)
    return choice
