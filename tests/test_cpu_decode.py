"""The C++ decode-attention kernel of XLA:CPU equals the XLA form it replaces (`xla_decode_attention`)
for every dtype pair, head size and group size, ring caches that wrap, rows with no allowed slot
and non-finite values in slots a row may not see; under a mesh each device computes its own rows;
without a compiler decoding falls back to the XLA form with one warning, and
CPE_JAX_CPU_DECODE_KERNEL=0 turns the kernel off."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpe_jax.errors import UserError
from cpe_jax.models.qwen2 import cpu_decode
from cpe_jax.models.qwen2.model import xla_decode_attention
from cpe_jax.sharding import make_mesh

pytestmark = pytest.mark.skipif(not cpu_decode.kernel_available(), reason="no C++ compiler on this machine")

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _case(b, kvh, groups, s, d, q_dtype, cache_dtype, end, seed=0):
    """Rows of ring lengths 0..s ending at slot `end` (some wrap), with NaN and inf in every slot
    a row may not see."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, kvh, groups, 1, d)), q_dtype)
    lengths = rng.integers(0, s + 1, size=b)
    lengths[0], lengths[-1] = 0, s
    allowed = ((end - np.arange(s)) % s)[None, :] < lengths[:, None]
    k, v = (rng.normal(size=(b, kvh, s, d)) * 3 for _ in range(2))
    k[~np.broadcast_to(allowed[:, None, :, None], k.shape)] = np.nan
    v[~np.broadcast_to(allowed[:, None, :, None], v.shape)] = np.inf
    return q, jnp.asarray(k, cache_dtype), jnp.asarray(v, cache_dtype), jnp.asarray(allowed)


def _kernel(q, k, v, allowed, end):
    return jax.jit(cpu_decode.decode_attention)(q[:, :, :, 0], k, v, allowed, end)[:, :, :, None]


def _reference(q, k, v, allowed, end):
    return jax.jit(xla_decode_attention, static_argnums=4)(q, k, v, allowed, end)


@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kvh, groups, d", [(2, 4, 64), (1, 7, 128), (3, 2, 16)])
def test_the_kernel_equals_the_xla_form(q_dtype, cache_dtype, kvh, groups, d):
    end = 37
    q, k, v, allowed = _case(6, kvh, groups, 96, d, q_dtype, cache_dtype, end)
    got, want = _kernel(q, k, v, allowed, end), _reference(q, k, v, allowed, end)
    assert got.dtype == want.dtype == q_dtype and got.shape == want.shape
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=TOLERANCE[q_dtype], atol=TOLERANCE[q_dtype])
    np.testing.assert_array_equal(got[0], 0.0)  # a row with no allowed slot gets zeros


def test_a_row_sums_in_token_order_wherever_its_slots_lie_in_the_ring():
    """The same tokens at slots [0, 40) and wrapped round a ring (slots 70..95, then 0..13) give
    bitwise the same result: the engine's ring and the static sampler's prefix cache agree."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 2, 4, 1, 64)), jnp.float32)
    k, v = (rng.normal(size=(1, 2, 40, 64)).astype(np.float32) for _ in range(2))
    prefix = np.zeros((1, 2, 96, 64), np.float32)
    ring = np.zeros_like(prefix)
    prefix[:, :, :40], ring[:, :, 70:], ring[:, :, :14] = k, k[:, :, :26], k[:, :, 26:]
    prefix_v, ring_v = np.zeros_like(prefix), np.zeros_like(prefix)
    prefix_v[:, :, :40], ring_v[:, :, 70:], ring_v[:, :, :14] = v, v[:, :, :26], v[:, :, 26:]
    prefix_allowed = np.arange(96)[None] < 40
    ring_allowed = (np.arange(96)[None] >= 70) | (np.arange(96)[None] < 14)
    a = _kernel(q, jnp.asarray(prefix), jnp.asarray(prefix_v), jnp.asarray(prefix_allowed), 39)
    b = _kernel(q, jnp.asarray(ring), jnp.asarray(ring_v), jnp.asarray(ring_allowed), 13)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_under_a_mesh_each_device_computes_its_own_rows_and_kv_heads():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    end = 50
    q, k, v, allowed = _case(8, 2, 4, 64, 64, jnp.float32, jnp.float32, end, seed=2)
    alone = np.asarray(_kernel(q, k, v, allowed, end))
    with jax.set_mesh(mesh):
        sharded = jax.jit(lambda *a: cpu_decode.decode_attention(*a)[:, :, :, None])(q[:, :, :, 0], k, v, allowed,
                                                                                      end)
    np.testing.assert_array_equal(np.asarray(sharded), alone)


def test_without_a_compiler_decoding_warns_once_and_runs_the_xla_form(tmp_path):
    script = """
import logging, jax.numpy as jnp
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from cpe_jax.errors import UserError
from cpe_jax.models.qwen2 import cpu_decode
q = jnp.zeros((1, 1, 1, 8)); k = jnp.zeros((1, 1, 4, 8))
print(cpu_decode.applies(q, k), cpu_decode.applies(q, k))
"""
    env = dict(os.environ, CXX="no-such-compiler-cpe", XDG_CACHE_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
    warnings = [line for line in result.stderr.splitlines() if "decode attention" in line]
    assert warnings == ["no C++ compiler (no-such-compiler-cpe): CPU decode attention runs the slower XLA form"]


def test_the_kernel_can_be_turned_off_and_a_bad_setting_is_named(monkeypatch):
    q, k = jnp.zeros((1, 1, 1, 8)), jnp.zeros((1, 1, 4, 8))
    assert cpu_decode.applies(q, k)
    assert not cpu_decode.applies(q.astype(jnp.float16), k)  # other dtypes run the XLA form
    monkeypatch.setenv("CPE_JAX_CPU_DECODE_KERNEL", "0")
    assert not cpu_decode.applies(q, k)
    monkeypatch.setenv("CPE_JAX_CPU_DECODE_KERNEL", "yes")
    with pytest.raises(UserError, match="^CPE_JAX_CPU_DECODE_KERNEL='yes' must be 0 or 1$"):
        cpu_decode.applies(q, k)
