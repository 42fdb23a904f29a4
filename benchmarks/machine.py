"""What both benchmarks share: the 26M-parameter Qwen2 they time and this machine's rooflines."""

import time

import jax
import jax.numpy as jnp
import numpy as np

# vocab 4096, hidden 512, 8 layers, 8 heads, 2 kv heads, intermediate 1376: 26M parameters.
MODEL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
             tie_word_embeddings=False)


def _best_seconds(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth(size_bytes=512 << 20, repeats=5):
    """Bytes per second of a large NumPy copy (read + write)."""
    src = np.ones(size_bytes // 8, np.float64)
    dst = np.empty_like(src)
    return 2 * size_bytes / _best_seconds(lambda: np.copyto(dst, src), repeats)


def matmul_peak(n=2048, repeats=5):
    """FLOP/s of a large float32 matmul under XLA. On a shared machine, measure it again between
    timed runs and keep the best figure."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * n**3 / _best_seconds(lambda: f(a).block_until_ready(), repeats)
