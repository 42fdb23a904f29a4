"""Causal self-attention without a cache (training, scoring, cache-less prefill), by backend.

`Qwen2Config.attention` picks the kernel; `auto` picks by `jax.default_backend()`:

- `cpu_blocked` (CPU): the blocked XLA:CPU kernels of `cpe_jax.models.qwen2.model`.
- `cudnn` (GPU): `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused kernel
  (16-bit compute; float32 compute runs the `xla` form).
- `splash` (TPU): the Pallas splash-attention kernel; `flash` is the older Pallas flash kernel.
- `xla`: `jax.nn.dot_product_attention(implementation="xla")`, plain XLA everywhere.

Every kernel here takes q [B, T, H, D] and k, v [B, T, KVH, D] (H a multiple of KVH: grouped
query attention) with key_mask [B, T], and returns [B, T, H, D]: query t sees key s <= t where
key s is valid, which is transformers' masking for any padding side. Off TPU the Pallas kernels
run in interpret mode (slow, for tests). Rows that are all padding return finite values.
"""

import jax
import jax.numpy as jnp

ATTENTION_CHOICES = ("auto", "cpu_blocked", "xla", "cudnn", "splash", "flash")
AUTO_ATTENTION = {"cpu": "cpu_blocked", "gpu": "cudnn", "tpu": "splash"}
PALLAS_BLOCK = 128  # the Pallas TPU kernels tile the sequence in multiples of this


def resolve_attention(choice: str) -> str:
    """The kernel `choice` names, with `auto` replaced by the backend's choice."""
    if choice != "auto":
        return choice
    return AUTO_ATTENTION.get(jax.default_backend(), "xla")


def uses_cpu_kernels() -> bool:
    """Whether the XLA:CPU matmul forms (2-D reshapes, row-major transposed copies, float32-result
    bfloat16 dots) apply: on CPU only; TPU and GPU get plain dot_generals."""
    return jax.default_backend() == "cpu"


def fused_causal_attention(q, k, v, key_mask, implementation: str):
    """Causal attention of q [B, T, H, D] over k, v [B, T, KVH, D] with key_mask [B, T], through
    the fused kernel `implementation` (one of xla, cudnn, splash, flash)."""
    if implementation == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        implementation = "xla"  # cuDNN's fused kernel takes 16-bit inputs only
    if implementation in ("xla", "cudnn"):
        return _dot_product_attention(q, k, v, key_mask, implementation)
    if implementation == "splash":
        return _splash_attention(q, k, v, key_mask)
    if implementation == "flash":
        return _flash_attention(q, k, v, key_mask)
    raise ValueError(implementation)


def _dot_product_attention(q, k, v, key_mask, implementation):
    b, t = key_mask.shape
    # [B, 1, T, T]: broadcast over heads (cuDNN takes a bias of that shape), causal added by the kernel.
    mask = jnp.broadcast_to(key_mask[:, None, None, :], (b, 1, t, t))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        implementation=implementation).astype(q.dtype)


def _padded_to_block(x, axis, block=PALLAS_BLOCK):
    pad = -x.shape[axis] % block
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _segments(key_mask):
    """Segment ids [B, T'] (T' padded to the kernel block): 1 for valid tokens, 0 for padding. A
    token attends only within its own segment, so valid queries never see padding and padding
    queries (masked downstream) see at least themselves."""
    return _padded_to_block(key_mask.astype(jnp.int32), 1)


def _splash_attention(q, k, v, key_mask):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, h, d = q.shape
    kvh = k.shape[2]
    groups = h // kvh
    segments = _segments(key_mask)
    tp = segments.shape[1]
    # Head-major, scaled (splash applies no softmax scale): q [B, KVH, G, T', D], k, v [B, KVH, T', D].
    q = _padded_to_block(q * jnp.asarray(d ** -0.5, q.dtype), 1)
    q = q.reshape(b, tp, kvh, groups, d).transpose(0, 2, 3, 1, 4)
    k = _padded_to_block(k, 1).transpose(0, 2, 1, 3)
    v = _padded_to_block(v, 1).transpose(0, 2, 1, 3)
    block = min(512, tp)
    while tp % block:
        block //= 2
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mqa_single_device(
        masks.MultiHeadMask([masks.CausalMask((tp, tp)) for _ in range(groups)]), block_sizes=sizes,
        interpret=jax.default_backend() != "tpu")

    def one_row(q_row, k_row, v_row, segment_row):  # [KVH, G, T', D], [KVH, T', D], [T']
        ids = splash.SegmentIds(q=segment_row, kv=segment_row)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(q, k, v, segments)  # [B, KVH, G, T', D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t].astype(q.dtype)


def _flash_attention(q, k, v, key_mask):
    from jax.experimental.pallas.ops.tpu import flash_attention as flash

    b, t, h, d = q.shape
    groups = h // k.shape[2]
    segments = _segments(key_mask)
    # The flash kernel has no grouped-query form: every query head gets its kv head's copy.
    q, k, v = (_padded_to_block(x, 1).transpose(0, 2, 1, 3) for x in (q, k, v))
    k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)

    def kernel(q, k, v, segments):
        return flash.flash_attention(q, k, v, segment_ids=flash.SegmentIds(q=segments, kv=segments),
                                     causal=True, sm_scale=d ** -0.5)

    if jax.default_backend() != "tpu":
        kernel = _interpreted(kernel)
    out = kernel(q, k, v, segments)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)


def _interpreted(fn):
    """`fn` (which calls Pallas TPU kernels) with its forward and backward passes both traced in
    Pallas's TPU interpret mode, which the kernels need off TPU."""
    from jax.experimental.pallas import tpu as pltpu

    @jax.custom_vjp
    def wrapped(*args):
        with pltpu.force_tpu_interpret_mode():
            return fn(*args)

    def forward(*args):
        with pltpu.force_tpu_interpret_mode():
            return jax.vjp(fn, *args)

    def backward(pullback, cotangent):
        with pltpu.force_tpu_interpret_mode():
            return pullback(cotangent)

    wrapped.defvjp(forward, backward)
    return wrapped
