"""What both benchmarks share: the 26M-parameter Qwen2 they time, the alternating timer and this
machine's rooflines."""

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


def matmul_peak(n=2048, repeats=5, dtype="float32"):
    """FLOP/s of a large matmul in `dtype` (float32 accumulation) under XLA. On a shared machine,
    measure it again between timed runs and keep the best figure."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    return 2 * n**3 / _best_seconds(lambda: f(a).block_until_ready(), repeats)


def alternate(ours, theirs, repeats, between=None):
    """Seconds of `repeats` runs of each, alternating. Each timed run follows an untimed run of the
    same function: the first run after the other framework pays for the memory and threads that
    framework left behind (~1.5x slower for XLA right after a PyTorch step), which a user of
    either alone never sees. `between()` runs after every round (roofline re-measurements)."""
    ours_times, theirs_times = [], []
    for _ in range(repeats):
        for fn, times in ((ours, ours_times), (theirs, theirs_times)):
            fn()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        if between is not None:
            between()
    return ours_times, theirs_times
