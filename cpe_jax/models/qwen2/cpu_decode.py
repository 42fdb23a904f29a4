"""One-token attention over a KV cache on XLA:CPU through a C++ kernel (`decode_attention.cc`).

XLA:CPU runs decode attention as batched dots of a few query rows against the cache, several
times slower than the bytes it reads allow (slower still in bfloat16), and it must read a window
that holds the longest row. The kernel reads each row's own allowed slots at memory speed, as
paged attention does, with the same numerics as `model.xla_decode_attention` (the reference the
tests compare it with).

The kernel is compiled once per machine with the system C++ compiler (`$CXX`, else `g++`) into
`$XDG_CACHE_HOME/cpe_jax/kernels` (else `~/.cache/cpe_jax/kernels`; a temporary directory when
that is not writable), keyed by the source, jaxlib's version and the CPU's features; without a
compiler, decoding logs one warning and runs the XLA form. `CPE_JAX_CPU_DECODE_KERNEL=0` runs the
XLA form on purpose (read when a decode step is traced).
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

from cpe_jax.errors import UserError
from cpe_jax.hardware import cpu_flags
from cpe_jax.models.qwen2.attention import uses_cpu_kernels
from cpe_jax.sharding import logical_to_spec

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.cc")
FFI_TARGET = "cpe_decode_attention"
KERNEL_ENV = "CPE_JAX_CPU_DECODE_KERNEL"
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-fPIC", "-shared")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpe_jax" / "kernels"


def _compile(compiler: str, out: Path) -> None:
    """Compile to a temporary file beside `out`, then rename: processes that compile at once
    (the hosts of a job on one machine) never load a half-written library."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=out.parent, suffix=".so.partial")
    os.close(fd)
    try:
        subprocess.run([compiler, *COMPILE_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", partial],
                       check=True, capture_output=True, text=True)
        os.replace(partial, out)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


@functools.cache
def kernel_available() -> bool:
    """Compile (or find the cached build of) the kernel and register it with XLA:CPU; False, after
    one warning, when it cannot be built here."""
    name = os.environ.get("CXX") or "g++"
    compiler = shutil.which(name)
    if compiler is None:
        log.warning("no C++ compiler (%s): CPU decode attention runs the slower XLA form", name)
        return False
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, *sorted(cpu_flags()), compiler,
                                    *COMPILE_FLAGS]).encode()).hexdigest()[:16]
    library = _cache_dir() / f"decode_attention-{key}.so"
    try:
        if not library.exists():
            try:
                _compile(compiler, library)
            except OSError:  # the cache directory is not writable
                library = Path(tempfile.mkdtemp(prefix="cpe_jax_kernels_")) / library.name
                _compile(compiler, library)
        handler = ctypes.cdll.LoadLibrary(str(library)).CpeDecodeAttention
    except (OSError, subprocess.CalledProcessError, AttributeError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
        log.warning("CPU decode attention kernel not built (%s): decoding runs the slower XLA form",
                    detail[0] if detail else type(e).__name__)
        return False
    jax.ffi.register_ffi_target(FFI_TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return True


def kernel_enabled() -> bool:
    """`CPE_JAX_CPU_DECODE_KERNEL`: 1 (the default) or 0."""
    flag = os.environ.get(KERNEL_ENV, "1").strip()
    if flag not in ("0", "1"):
        raise UserError(f"{KERNEL_ENV}={flag!r} must be 0 or 1")
    return flag == "1"


def applies(q, k) -> bool:
    """Whether the kernel runs this decode step: on CPU, float32/bfloat16 queries and cache,
    unless turned off."""
    return (uses_cpu_kernels() and jnp.dtype(q.dtype) in SUPPORTED_DTYPES
            and jnp.dtype(k.dtype) in SUPPORTED_DTYPES and kernel_enabled() and kernel_available())


def decode_attention(q, k, v, allowed, end):
    """Attention of q [B, KVH, G, D] over the slots of k, v [B, KVH, S, D] that allowed [B, S]
    permits, summed oldest first from the slot after the newest, `end`; [B, KVH, G, D] in q's
    dtype. Under a mesh each device runs the kernel on its own rows and kv heads (sharded as the
    cache is)."""
    def kernel(q, k, v, allowed, end):
        return jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype),
                                vmap_method="sequential")(q, k, v, allowed.astype(bool), end)

    end = jnp.asarray(end, jnp.int32)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return kernel(q, k, v, allowed, end)
    heads = logical_to_spec(("batch", "kv_heads", None, None), k.shape, mesh)
    rows = jax.sharding.PartitionSpec(heads[0], None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads, heads, heads, rows, jax.sharding.PartitionSpec()),
                         out_specs=heads, check_vma=False)(q, k, v, allowed, end)
