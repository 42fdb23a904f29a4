"""Qwen2 / Qwen2.5 decoder in Flax NNX, numerically matching transformers' `Qwen2ForCausalLM`.

Order: config (with one classmethod per Qwen2.5 size) -> small layers -> model -> KV cache.
Every parameter carries `logical_axes` metadata; `cpe_jax.sharding` maps those names to the mesh.
One forward serves training and KV-cache decoding:

    logits, new_cache = model(tokens, positions, cache, mask)

Without a cache, `mask` is the [B, T] key-validity mask of the tokens themselves. With a cache
({"k", "v": one [B, KVH, S, D] array per layer, "end": slots filled}), the T new tokens are written at slots
[end, end + T) and `mask` is the [B, S] validity of every cache slot; attention is causal in slot
order, so cached prompts are left-padded. One new token (T = 1, decoding) sees exactly the slots
its mask allows, which must include `end` and nothing written later (slot order is not used, so a
ring-buffer cache works: see `cpe_jax.engine`).
"""

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
from functools import partial
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from cpe_jax.errors import UserError
from cpe_jax.hardware import cpu_multiplies_natively
from cpe_jax.models.qwen2 import cpu_decode
from cpe_jax.models.qwen2.attention import (
    ATTENTION_CHOICES, fused_causal_attention, resolve_attention, uses_cpu_kernels)
from cpe_jax.sharding import LOGICAL_AXIS_RULES, logical_to_spec

logger = logging.getLogger(__name__)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # hidden_size // num_attention_heads when None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: Optional[int] = 151643
    eos_token_id: Union[int, tuple, None] = 151643
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # one of REMAT_POLICIES
    # Runtime choices, not part of the checkpoint (never written to config.json):
    attention: str = "auto"  # one of ATTENTION_CHOICES; auto = by backend (see attention.py)
    scan_layers: Optional[bool] = None  # decoder layers as one nnx.scan; None = on TPU/GPU, off on CPU

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_CHOICES:
            raise UserError(f"attention={self.attention!r} is not one of {list(ATTENTION_CHOICES)}")
        if self.scan_layers not in (None, True, False):
            raise UserError(f"scan_layers={self.scan_layers!r} is not true, false or unset")
        for field in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, field))
            except TypeError:
                raise UserError(f"{field}={getattr(self, field)!r} is not a dtype") from None

    def replace(self, **changes) -> "Qwen2Config":
        return dataclasses.replace(self, **changes)

    @property
    def scanned(self) -> bool:
        """Whether the decoder layers are one scanned, stacked module (`scan_layers`, by backend when unset)."""
        if self.scan_layers is None:
            return jax.default_backend() in ("tpu", "gpu")
        return bool(self.scan_layers)

    @property
    def num_parameters(self) -> int:
        e, d = self.hidden_size, self.head_dim
        h, kv = self.num_attention_heads, self.num_key_value_heads
        attn = e * h * d + h * d + 2 * (e * kv * d + kv * d) + h * d * e
        layer = attn + 3 * e * self.intermediate_size + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_hidden_layers * layer + e + head

    def flops_per_token(self, context: int = 0) -> int:
        """Matmul FLOPs of one token's forward pass attending to `context` tokens: 2 per weight
        of every dense layer and the LM head (an embedding lookup costs none) plus QK^T and AV.
        A training token costs 3x this (forward + backward), as in MFU accounting."""
        e, d = self.hidden_size, self.head_dim
        h, kv = self.num_attention_heads, self.num_key_value_heads
        layer = e * h * d + 2 * e * kv * d + h * d * e + 3 * e * self.intermediate_size
        weights = self.num_hidden_layers * layer + self.vocab_size * e  # + the LM head
        return 2 * weights + 4 * self.num_hidden_layers * h * d * int(context)

    # ---- Hugging Face config.json -------------------------------------------------------------
    _HF_FIELDS = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
        "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id",
        "initializer_range",
    )

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json", **overrides) -> "Qwen2Config":
        model_type = hf.get("model_type")
        if model_type != "qwen2":
            raise UserError(f"{source}: model_type {model_type!r} is not supported (expected 'qwen2')")
        rope_scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", None):
            raise UserError(f"{source}: rope_scaling type {rope_type!r} is not supported")
        if hf.get("use_sliding_window"):
            raise UserError(f"{source}: use_sliding_window=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (expected 'silu')")
        fields = {k: hf[k] for k in cls._HF_FIELDS if hf.get(k) is not None}
        for key in SPECIAL_TOKEN_FIELDS:
            fields[key] = hf.get(key)  # null or absent stays None: no Qwen default comes back
        if "rope_theta" not in fields and rope_scaling.get("rope_theta") is not None:
            fields["rope_theta"] = rope_scaling["rope_theta"]  # transformers >= 5 nests it here
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in fields:
                raise UserError(f"{source}: missing field {key!r}")
        fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
        fields.update(overrides)
        fields.update(_in_vocab_special_ids(fields, source))
        return cls(**fields)

    @classmethod
    def from_pretrained(cls, model_dir: str, **overrides) -> "Qwen2Config":
        path = os.path.join(model_dir, "config.json")
        if not os.path.exists(path):
            raise UserError(f"no config.json in {model_dir}")
        try:
            with open(path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e})") from None
        return cls.from_hf_dict(hf, source=path, **overrides)

    def to_hf_dict(self) -> dict:
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "rope_scaling": None,
            "torch_dtype": self.param_dtype,
            **{k: getattr(self, k) for k in self._HF_FIELDS if k != "eos_token_id"},
            "eos_token_id": eos,
        }

    # ---- Qwen2.5 presets (architecture of the released checkpoints) -------------------------
    @classmethod
    def qwen2_5_0_5b(cls, **kw):
        return cls(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, **kw)

    @classmethod
    def qwen2_5_1_5b(cls, **kw):
        return cls(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, **kw)

    @classmethod
    def qwen2_5_3b(cls, **kw):
        return cls(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                   num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True, **kw)

    @classmethod
    def qwen2_5_7b(cls, **kw):
        return cls(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, **kw)

    @classmethod
    def qwen2_5_14b(cls, **kw):
        return cls(vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                   num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                   rms_norm_eps=1e-5, **kw)

    @classmethod
    def qwen2_5_32b(cls, **kw):
        return cls(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                   num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                   rms_norm_eps=1e-5, **kw)

    @classmethod
    def qwen2_5_72b(cls, **kw):
        return cls(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                   num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                   rms_norm_eps=1e-5, **kw)


SPECIAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id")


def _in_vocab_special_ids(fields, source):
    """The special-id fields of a config dict with ids outside [0, vocab_size) dropped, with one
    warning naming each dropped field and value: such an id can never be sampled, and fed to the
    embedding it reads past the table (NaN)."""
    vocab, kept, dropped = int(fields["vocab_size"]), {}, []
    for key in SPECIAL_TOKEN_FIELDS:
        value = fields.get(key)
        if value is None:
            continue
        ids = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
        good = [i for i in ids if 0 <= i < vocab]
        if len(good) == len(ids):
            continue
        dropped.append(f"{key}={value}")
        if isinstance(value, (list, tuple)):
            kept[key] = tuple(good) or None
        else:
            kept[key] = None
    if dropped:
        logger.warning("%s: special token ids outside the vocabulary [0, %d) are ignored: %s",
                       source, vocab, ", ".join(dropped))
    return kept


PRESETS = {
    "qwen2.5-0.5b": Qwen2Config.qwen2_5_0_5b,
    "qwen2.5-1.5b": Qwen2Config.qwen2_5_1_5b,
    "qwen2.5-3b": Qwen2Config.qwen2_5_3b,
    "qwen2.5-7b": Qwen2Config.qwen2_5_7b,
    "qwen2.5-14b": Qwen2Config.qwen2_5_14b,
    "qwen2.5-32b": Qwen2Config.qwen2_5_32b,
    "qwen2.5-72b": Qwen2Config.qwen2_5_72b,
}


# ---- helpers ---------------------------------------------------------------------------------


class StaticDict(dict):
    """A dict that can live on a module as static metadata (e.g. `generation_config`): graph
    definitions must be hashable to serve as jit cache keys."""

    def __hash__(self):
        return hash(json.dumps(self, sort_keys=True, default=str))


def constrain(x, logical_axes):
    """Shard an activation by logical axes when tracing under a mesh (`jax.set_mesh`); else no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def _param(rngs, init, shape, dtype, logical_axes):
    assert all(a is None or a in LOGICAL_AXIS_RULES for a in logical_axes)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(logical_axes))


def positions_from_mask(mask):
    """Token positions from a [B, T] validity mask: 0 at each row's first real token (any padding side)."""
    mask = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


def valid_tokens(tokens, mask, cache=None):
    """tokens [B, T] with every masked position replaced by id 0, so a pad id outside the
    vocabulary (a gather out of range returns NaN) can never reach the embedding. Without a
    cache `mask` is [B, T]; with one it is [B, S] over cache slots and the tokens sit at
    [end, end + T)."""
    if cache is not None:
        mask = jax.lax.dynamic_slice_in_dim(mask, cache["end"], tokens.shape[1], axis=1)
    return jnp.where(mask.astype(bool), tokens, jnp.zeros((), tokens.dtype))


def rotary(x, positions, theta):
    """Apply rotary embeddings (HF's rotate-half layout) to x [B, T, H, D] at positions [B, T]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def dot_operands(*operands):
    """The operands of a float32-accumulating dot, as this backend multiplies them fastest: as
    they are on TPU, GPU and where the CPU multiplies their dtype natively (AMX for bfloat16);
    elsewhere on CPU upcast to float32, where XLA:CPU runs a bfloat16 dot ~1.5x slower than the
    float32 dot of the same values. The upcast changes no product (two bfloat16 or float16
    values multiply exactly in float32), so the result differs only in summation order."""
    if not uses_cpu_kernels():
        return operands
    return tuple(a if cpu_multiplies_natively(jnp.dtype(a.dtype).name) else a.astype(jnp.float32)
                 for a in operands)


_WEIGHTS_HOLD_COMPUTE_VALUES = contextvars.ContextVar("weights_hold_compute_values", default=False)


@contextlib.contextmanager
def weights_hold_compute_values():
    """Functions traced within this take float32 weights as already holding compute-dtype values
    (`compute_dtype_params` made them so, on a CPU that multiplies float32 copies) and multiply
    them as they are: rounding them again is a conversion of every weight at every call, which
    XLA cannot tell is exact. Only for parameters that went through `compute_dtype_params`."""
    token = _WEIGHTS_HOLD_COMPUTE_VALUES.set(True)
    try:
        yield
    finally:
        _WEIGHTS_HOLD_COMPUTE_VALUES.reset(token)


def in_compute_dtype(weight, dtype):
    """`weight` cast to the compute `dtype`, or as it is where it already holds such values
    (`weights_hold_compute_values`)."""
    if _WEIGHTS_HOLD_COMPUTE_VALUES.get() and weight.dtype == jnp.float32:
        return weight
    return weight.astype(dtype)


def _dense(x, kernel, bias=None, out_dtype=None):
    """x [B, T, E] times kernel [E, ...] (+ bias [...]), the kernel and bias cast to x's dtype: a
    plain dot_general on TPU and GPU; on CPU ONE 2-D [B*T, E] matmul accumulating in float32.

    2-D because XLA:CPU emits the backward pass of a 3-D dot with slow fused transposes (~2x the
    cost of the whole MLP backward); a float32 result, with the bias added in float32, because
    XLA:CPU runs a bfloat16-output dot as a float32 one (bfloat16 x bfloat16 -> float32 runs on
    AMX, ~5x faster; without AMX on float32 copies, see `dot_operands`) and sums a bfloat16 bias
    gradient through a slow exact reduction."""
    b, t, e = x.shape
    if not uses_cpu_kernels():
        out = jnp.einsum("bte,ef->btf", x, kernel.astype(x.dtype).reshape(e, -1),
                         preferred_element_type=out_dtype)
        if bias is not None:
            out = out + bias.astype(out.dtype).reshape(-1)
        return out.astype(out_dtype or x.dtype).reshape(b, t, *kernel.shape[1:])
    x2, k2 = x.reshape(b * t, e), in_compute_dtype(kernel, x.dtype).reshape(e, -1)
    out = jnp.dot(x2, k2) if x.dtype == jnp.float32 else _low_precision_matmul(x2, k2)
    if bias is not None:
        out = out + bias.astype(x.dtype).astype(jnp.float32).reshape(-1)
    return out.astype(out_dtype or x.dtype).reshape(b, t, *kernel.shape[1:])


@jax.custom_vjp
def _low_precision_matmul(x, kernel):
    """x @ kernel in the inputs' dtype with a float32 result, whose gradients are also computed
    as input-dtype matmuls (autodiff alone would run them on the float32 cotangent)."""
    return jnp.dot(*dot_operands(x, kernel), preferred_element_type=jnp.float32)


def _low_precision_matmul_fwd(x, kernel):
    return _low_precision_matmul(x, kernel), (x, kernel)


def _low_precision_matmul_bwd(residuals, g):
    x, kernel = residuals
    g = g.astype(x.dtype)
    dx = jnp.dot(*dot_operands(g, _transposed_copy(kernel)), preferred_element_type=jnp.float32)
    dk = jnp.dot(*dot_operands(_transposed_copy(x), g), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _transposed_copy(a):
    """a.T as a row-major copy. XLA folds a plain transpose into the dot's dimension numbers, and
    XLA:CPU runs a bfloat16 dot with a transposed operand ~5x slower than a row-major one."""
    return jax.lax.optimization_barrier(a.T.reshape(-1)).reshape(a.shape[1], a.shape[0])


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


# ---- attention -------------------------------------------------------------------------------

QUERY_BLOCK = 128  # rows of a causal attention block (without a cache)


def _matmul(a, b):
    """Batched a [..., I, J] @ b [..., J, L] with a float32 result."""
    return jnp.einsum("...ij,...jl->...il", *dot_operands(a, b), preferred_element_type=jnp.float32)


def _swap_minor(a):
    """a with its last two axes swapped, as a row-major copy (see `_transposed_copy`)."""
    swapped = jnp.swapaxes(a, -1, -2)
    return jax.lax.optimization_barrier(swapped.reshape(-1)).reshape(swapped.shape)


def query_blocks(t, block):
    """[(start, stop)]: the query rows [0, t) in blocks of `block` rows."""
    return [(start, min(start + block, t)) for start in range(0, t, block)]


def causal_score_fraction(t, block=QUERY_BLOCK):
    """The fraction of the [t, t] score matrix the blocked kernel computes (each block's rows
    against the keys up to its run's end, see `query_runs`)."""
    return sum(rows * count * (start + rows * count) for start, rows, count in query_runs(t, block)) / t**2


MAX_QUERY_RUNS = 4  # at most this many compiled loop bodies per attention, whatever the length


def query_runs(t, block, max_runs=MAX_QUERY_RUNS):
    """[(start, rows, count)]: the query rows [0, t) as runs of `count` blocks of `rows` rows each,
    a run's keys ending at its last row. Each run is one compiled loop over its blocks, so the
    program does not grow with the length; a run of c blocks computes c(c-1)/2 block pairs of the
    upper triangle that a per-block key range would skip (none up to max_runs blocks, 17% more
    score entries at 2048 tokens; XLA:CPU compiles each loop body in ~1 s, so few runs keep the
    compile time flat). A last partial block is a run of its own."""
    full, rest = divmod(t, block)
    runs, start = [], 0
    if full:
        n = min(full, max_runs)
        for i in range(n):
            count = full // n + (1 if i < full % n else 0)
            runs.append((start, block, count))
            start += count * block
    if rest:
        runs.append((start, rest, 1))
    return runs


def _rows(x, start, size, axis):
    """x[..., start:start + size, ...] along `axis`; a static slice for a Python int start."""
    if isinstance(start, int):
        return jax.lax.slice_in_dim(x, start, start + size, axis=axis)
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _over_blocks(body, carry, start, rows, count):
    """Run body(carry, block_start) -> (carry, out) over a run's `count` blocks: straight-line code
    for one block, else a compiled loop whose outputs are joined along a new leading axis."""
    if count == 1:
        carry, out = body(carry, start)
        return carry, jax.tree.map(lambda a: a[None], out)
    return jax.lax.scan(lambda c, i: body(c, start + i * rows), carry, jnp.arange(count))


def _joined_blocks(stacked, axis):
    """[count, ...] per-block outputs joined block after block along `axis` (of one block's array)."""
    moved = jnp.moveaxis(stacked, 0, axis)
    shape = moved.shape
    return moved.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2:])


def _causal_allowed(start, rows, stop, key_mask):
    """[B, rows, stop]: query t in [start, start + rows) may see key s <= t where the key is valid."""
    causal = jnp.arange(stop)[None, :] <= (start + jnp.arange(rows))[:, None]
    return causal[None] & key_mask[:, None, :stop]


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _causal_attention(q, k, v, key_mask, groups, block):
    """Causal softmax attention without a cache, flash style: q [B, KVH, T*G, D] (rows t-major,
    the G query heads of a kv head side by side), k, v [B, KVH, T, D], key_mask [B, T].

    A query block only meets keys before the end of its run (`query_runs`), which skips most of
    the upper triangle; the backward pass recomputes the probabilities from the saved
    log-sum-exp instead of keeping a [T, T] matrix per head, and every matmul in both passes
    reads row-major operands (the fast form on XLA:CPU, AMX for bfloat16)."""
    return _causal_attention_fwd(q, k, v, key_mask, groups, block)[0]


def _masked_scores(scores, allowed, groups):
    """scores [B, KVH, R, S] (R = rows t-major) where allowed [B, R/groups, S], else the mask value."""
    b, kvh, r, s = scores.shape
    scores = scores.reshape(b, kvh, r // groups, groups, s)
    scores = jnp.where(allowed[:, None, :, None, :], scores, _MASK_VALUE)
    return scores.reshape(b, kvh, r, s)


def _causal_attention_fwd(q, k, v, key_mask, groups, block):
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for start, rows, count in query_runs(k.shape[2], block):
        stop = start + rows * count
        k_t, v_run = _swap_minor(k[:, :, :stop]), v[:, :, :stop]

        def body(carry, row_start, rows=rows, stop=stop, k_t=k_t, v_run=v_run):
            scores = _matmul(_rows(q, row_start * groups, rows * groups, 2), k_t) * scale
            scores = _masked_scores(scores, _causal_allowed(row_start, rows, stop, key_mask), groups)
            top = jnp.max(scores, axis=-1, keepdims=True)
            probs = jnp.exp(scores - top)
            total = jnp.sum(probs, axis=-1, keepdims=True)
            return carry, (_matmul(probs.astype(v_run.dtype), v_run) / total, (top + jnp.log(total))[..., 0])

        _, (out, lse) = _over_blocks(body, None, start, rows, count)
        outs.append(_joined_blocks(out, 2))
        lses.append(_joined_blocks(lse, 2))
    out = jnp.concatenate(outs, axis=2).astype(q.dtype)
    lse = jnp.concatenate(lses, axis=2)
    return out, (q, k, v, key_mask, out, lse)


def _causal_attention_bwd(groups, block, residuals, d_out):
    """Flash-attention backward in key-major form: with s^T = k q^T every product below is a
    row-major matmul; only q^T, dO^T, k^T and dq are transposed copies."""
    q, k, v, key_mask, out, lse = residuals
    scale = q.shape[-1] ** -0.5
    dt = q.dtype
    t = k.shape[2]
    d_out = d_out.astype(dt)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, KVH, R]
    q_t, d_out_t = _swap_minor(q), _swap_minor(d_out)
    dq_t, dk, dv = [], 0.0, 0.0
    for start, rows, count in query_runs(t, block):
        stop = start + rows * count
        k_run, v_run = k[:, :, :stop], v[:, :, :stop]
        k_run_t = _swap_minor(k_run)

        def body(carry, row_start, rows=rows, stop=stop, k_run=k_run, v_run=v_run, k_run_t=k_run_t):
            r0, r = row_start * groups, rows * groups
            scores_t = _matmul(k_run, _rows(q_t, r0, r, 3)) * scale  # [B, KVH, stop, r]
            allowed_t = jnp.swapaxes(_causal_allowed(row_start, rows, stop, key_mask), 1, 2)
            b, kvh = scores_t.shape[:2]
            scores_t = jnp.where(allowed_t[:, None, :, :, None], scores_t.reshape(b, kvh, stop, rows, groups),
                                 _MASK_VALUE).reshape(b, kvh, stop, r)
            probs_t = jnp.exp(scores_t - _rows(lse, r0, r, 2)[:, :, None, :])
            d_out_i = _rows(d_out, r0, r, 2)
            dv_i = _matmul(probs_t.astype(dt), d_out_i)
            dprobs_t = _matmul(v_run, _rows(d_out_t, r0, r, 3))
            dscores_t = (probs_t * (dprobs_t - _rows(delta, r0, r, 2)[:, :, None, :]) * scale).astype(dt)
            dk_i = _matmul(dscores_t, _rows(q, r0, r, 2))
            dk_sum, dv_sum = carry
            return (dk_sum + dk_i, dv_sum + dv_i), _matmul(k_run_t, dscores_t)

        zeros = jnp.zeros(k_run.shape, jnp.float32)
        (dk_run, dv_run), dq_run_t = _over_blocks(body, (zeros, zeros), start, rows, count)
        dq_t.append(_joined_blocks(dq_run_t, 3))
        pad = ((0, 0), (0, 0), (0, t - stop), (0, 0))
        dk, dv = dk + jnp.pad(dk_run, pad), dv + jnp.pad(dv_run, pad)
    dq = _swap_minor(jnp.concatenate(dq_t, axis=-1))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def zero_masked_keys(x, key_mask):
    """x [B, KVH, S, D] with the slots where key_mask [B, S] is False set to 0.

    A masked key's probability is exactly 0, but 0 x NaN (or inf) is NaN: without this, one
    non-finite key or value at a masked slot (a padded token, a stale cache slot) reaches every
    row through probabilities x values, and through k^T x d_scores in the backward pass."""
    return jnp.where(key_mask[:, None, :, None], x, jnp.zeros((), x.dtype))


def _attention(q, k, v, allowed):
    """Softmax attention of q [B, KVH, G, T, D] over k, v [B, KVH, S, D] where allowed [B, T, S];
    the G query heads of a kv head share one matmul against its keys. Keys that no query may see
    cannot change the result, whatever their values."""
    v = zero_masked_keys(v, jnp.any(allowed, axis=1))
    b, kvh, groups, t, d = q.shape
    s = k.shape[2]
    scores = jnp.einsum("bkqd,bksd->bkqs", *dot_operands(q.reshape(b, kvh, groups * t, d), k),
                        preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kvh, groups, t, s) * (d ** -0.5)
    scores = jnp.where(allowed[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kvh, groups * t, s)
    out = jnp.einsum("bkqs,bksd->bkqd", *dot_operands(probs, v), preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, kvh, groups, t, d)


def _write_slots(cache, new, end):
    """cache [B, KVH, S, D] with `new` [B, KVH, T, D] written at slots [end, end + T), in place
    (a 16-bit cache as raw bits, `as_raw_bits`)."""
    return as_raw_bits(partial(jax.lax.dynamic_update_slice, start_indices=(0, 0, end, 0)), cache,
                       new.astype(cache.dtype))


def as_raw_bits(update, cache, new):
    """update(cache, new) (a write of `new` into `cache`, both of one dtype) on the raw bits of a
    16-bit cache: XLA:CPU otherwise moves a float32 -> bfloat16 conversion past the write and
    rewrites the whole cache through float32."""
    if cache.dtype.itemsize != 2:
        return update(cache, new)
    bits = jax.lax.bitcast_convert_type
    return bits(update(bits(cache, jnp.uint16), bits(new, jnp.uint16)), cache.dtype)


SMALLEST_DECODE_WINDOW = 64  # cache slots of the shortest window decode attention reads


def decode_windows(cache_length: int) -> tuple:
    """The window sizes one-token attention may read from a cache of `cache_length` slots: powers
    of two from 64 up to 3/4 of the cache (a wider window would save too little to pay for its
    gather), then the whole cache."""
    windows, size = [], SMALLEST_DECODE_WINDOW
    while size * 4 <= cache_length * 3:
        windows.append(size)
        size *= 2
    return (*windows, cache_length)


def live_span(allowed, end):
    """The number of slots, counted back from slot `end` in ring order, that hold every allowed
    slot of every row (allowed [B, S]); 0 when nothing is allowed."""
    behind = (end - jnp.arange(allowed.shape[-1])) % allowed.shape[-1]
    return jnp.max(jnp.where(allowed, behind, -1)) + 1


def decode_attention(q, k, v, allowed, end):
    """`_attention` for one query position (q [B, KVH, G, 1, D], allowed [B, S]) over a cache k, v
    [B, KVH, S, D] whose newest slot is `end`: on CPU the C++ kernel of `cpu_decode`, which reads
    each row's own slots; elsewhere (and where it cannot be built) `xla_decode_attention`."""
    if cpu_decode.applies(q, k):
        return cpu_decode.decode_attention(q[:, :, :, 0], k, v, allowed, end)[:, :, :, None]
    return xla_decode_attention(q, k, v, allowed, end)


def xla_decode_attention(q, k, v, allowed, end):
    """`_attention` for one query position (allowed [B, S]) over a cache k, v [B, KVH, S, D]
    whose newest slot is `end`: it reads only the smallest window of `decode_windows` that ends at
    `end` (wrapping as a ring does) and holds the longest-lived row's slots (`live_span`), so a
    batch of short rows does not pay for the whole cache.

    q.k is a broadcast product summed over D (one fusion that reads each key once; XLA:CPU runs a
    batched dot of a few query rows against the keys several times slower) and p.v one batched
    dot. Slots that are not allowed cannot change the result, whatever their values."""
    s, d = k.shape[2], q.shape[-1]

    def attend(k, v, allowed):  # slot-major [B, KVH, W, G]: sums over slots run in slot order
        queries = q[:, :, None, :, 0].astype(jnp.float32)  # [B, KVH, 1, G, D]
        scores = jnp.sum(k[:, :, :, None].astype(jnp.float32) * queries, axis=-1)
        scores = jnp.where(allowed[:, None, :, None], scores * (d ** -0.5), _MASK_VALUE)
        probs = _swap_minor(jax.nn.softmax(scores, axis=2).astype(q.dtype))
        return _matmul(probs, zero_masked_keys(v, allowed).astype(q.dtype)).astype(q.dtype)[:, :, :, None]

    def window(size):
        if size == s:
            return lambda: attend(k, v, allowed)
        slots = (end - size + 1 + jnp.arange(size)) % s
        return lambda: attend(jnp.take(k, slots, axis=2, mode="clip"), jnp.take(v, slots, axis=2, mode="clip"),
                              jnp.take(allowed, slots, axis=1, mode="clip"))

    windows = decode_windows(s)
    which = jnp.searchsorted(jnp.asarray(windows[:-1]), live_span(allowed, end))
    return jax.lax.switch(which, [window(size) for size in windows])


# ---- layers ----------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    def __init__(self, size, eps, param_dtype, *, rngs):
        self.eps = eps
        self.weight = _param(rngs, nnx.initializers.ones, (size,), param_dtype, ("norm",))

    def __call__(self, x):
        # The scale is applied in float32 too: a bfloat16 weight gradient is summed by XLA:CPU
        # through a slow exact reduction.
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...].astype(dtype).astype(jnp.float32)
        return (weight * x.astype(dtype).astype(jnp.float32)).astype(dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs):
        e, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        init = nnx.initializers.normal(cfg.initializer_range)
        zeros, pd = nnx.initializers.zeros, cfg.param_dtype
        self.cfg = cfg
        self.q_kernel = _param(rngs, init, (e, h, d), pd, ("embed", "heads", "head_dim"))
        self.q_bias = _param(rngs, zeros, (h, d), pd, ("heads", "head_dim"))
        self.k_kernel = _param(rngs, init, (e, kv, d), pd, ("embed", "kv_heads", "head_dim"))
        self.k_bias = _param(rngs, zeros, (kv, d), pd, ("kv_heads", "head_dim"))
        self.v_kernel = _param(rngs, init, (e, kv, d), pd, ("embed", "kv_heads", "head_dim"))
        self.v_bias = _param(rngs, zeros, (kv, d), pd, ("kv_heads", "head_dim"))
        self.o_kernel = _param(rngs, init, (h, d, e), pd, ("heads", "head_dim", "embed"))

    def __call__(self, x, positions, mask, cache_kv, cache_end, attention="cpu_blocked"):
        """`attention` is the resolved kernel for cache-less attention (see attention.py)."""
        cfg, dt = self.cfg, x.dtype
        b, t = x.shape[:2]
        kvh, d = cfg.num_key_value_heads, cfg.head_dim
        groups = cfg.num_attention_heads // kvh
        q = _dense(x, self.q_kernel[...], self.q_bias[...])
        k = _dense(x, self.k_kernel[...], self.k_bias[...])
        v = _dense(x, self.v_kernel[...], self.v_bias[...])
        q = constrain(rotary(q, positions, cfg.rope_theta), ("batch", "length", "heads", "head_dim"))
        k = rotary(k, positions, cfg.rope_theta)
        if cache_kv is None and attention != "cpu_blocked":
            key_mask = mask.astype(bool)
            k, v = (jnp.where(key_mask[:, :, None, None], a, jnp.zeros((), a.dtype)) for a in (k, v))
            out = fused_causal_attention(q, k, v, key_mask, attention)
            return _dense(out.reshape(b, t, -1), self.o_kernel[...].reshape(-1, cfg.hidden_size)), None
        # Head-major [B, KVH, T, D] (the cache layout): both attention matmuls then batch over
        # (b, kv head) and contract the minor dimensions, so the cache is never transposed.
        q = q.reshape(b, t, kvh, groups, d).transpose(0, 2, 3, 1, 4)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

        query_slots = jnp.arange(t)
        if cache_kv is not None:
            cache_k, cache_v = cache_kv
            cache_k = _write_slots(cache_k, k, cache_end)
            cache_v = _write_slots(cache_v, v, cache_end)
            k, v = cache_k.astype(dt), cache_v.astype(dt)
            query_slots = query_slots + cache_end
            new_cache_kv = (cache_k, cache_v)
        else:
            new_cache_kv = None
        if cache_kv is None:
            # Training and scoring: rows t-major, [B, KVH, T*G, D].
            rows = q.transpose(0, 1, 3, 2, 4).reshape(b, kvh, t * groups, d)
            key_mask = mask.astype(bool)
            k, v = zero_masked_keys(k, key_mask), zero_masked_keys(v, key_mask)
            out = _causal_attention(rows, k, v, key_mask, groups, QUERY_BLOCK)
            out = out.reshape(b, kvh, t, groups, d).transpose(0, 2, 1, 3, 4)
        else:
            s = k.shape[2]
            q = q.reshape(b, kvh, groups, t, d)
            if t == 1:
                # One new token: the mask alone says what it sees (it must cover the slot being
                # written and no later one), so a ring-buffer cache whose live slots wrap works too.
                out = decode_attention(q, cache_k, cache_v, mask.astype(bool), cache_end)
            else:
                allowed = (jnp.arange(s)[None, :] <= query_slots[:, None])[None] & mask[:, None, :].astype(bool)
                out = _attention(q, k, v, allowed)
            out = out.transpose(0, 3, 1, 2, 4)
        # One [B*T, H*D] x [H*D, E] matmul: the kernel keeps its stored layout.
        out = out.reshape(b, t, kvh * groups * d)
        o_kernel = self.o_kernel[...]
        out = _dense(out, o_kernel.reshape(-1, o_kernel.shape[-1]))
        return out, new_cache_kv


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs):
        e, m, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        init = nnx.initializers.normal(cfg.initializer_range)
        self.gate_kernel = _param(rngs, init, (e, m), pd, ("embed", "mlp"))
        self.up_kernel = _param(rngs, init, (e, m), pd, ("embed", "mlp"))
        self.down_kernel = _param(rngs, init, (m, e), pd, ("mlp", "embed"))

    def __call__(self, x):
        gate = _dense(x, self.gate_kernel[...])
        up = _dense(x, self.up_kernel[...])
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _dense(h, self.down_kernel[...])


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, cache_kv, cache_end, attention="cpu_blocked"):
        attn_out, cache_kv = self.attn(self.input_norm(x), positions, mask, cache_kv, cache_end, attention)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_norm(x))
        return constrain(x, ("batch", "length", "embed")), cache_kv


def _layer_runner(attention):
    """layer(x, positions, mask, cache_kv, cache_end) with the attention kernel fixed (a closure,
    not an argument: nnx.remat takes positional array arguments only)."""

    def run(layer, x, positions, mask, cache_kv, cache_end):
        return layer(x, positions, mask, cache_kv, cache_end, attention)

    return run


LAYER_AXIS = None  # logical axis of the stacked layer dimension: replicated (one layer per scan step)


def stacked_layers(config: Qwen2Config, rngs: nnx.Rngs) -> DecoderLayer:
    """ONE DecoderLayer whose parameters carry a leading [num_hidden_layers] axis (layer i's
    weights at index i, each layer initialised from its own key), for `nnx.scan`."""

    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(layer_rngs):
        return DecoderLayer(config, rngs=layer_rngs)

    layers = make(rngs)
    for _, var in nnx.iter_graph(layers):
        if isinstance(var, nnx.Variable):
            var.set_metadata("logical_axes", (LAYER_AXIS,) + tuple(var.get_metadata()["logical_axes"]))
    return layers


def map_layers(fn, *per_layer):
    """fn applied to each layer's entry of KV-cache parts (`cache["k"]`, `cache["v"]`): a tuple of
    per-layer arrays (unrolled stack) or one stacked [L, ...] array (scanned stack)."""
    if isinstance(per_layer[0], (tuple, list)):
        return tuple(map(fn, *per_layer))
    return jax.vmap(fn)(*per_layer)


# ---- model -----------------------------------------------------------------------------------


class Qwen2ForCausalLM(nnx.Module):
    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        e, v, pd = config.hidden_size, config.vocab_size, config.param_dtype
        self.embed = _param(rngs, init, (v, e), pd, ("vocab", "embed"))
        config = config.replace(scan_layers=config.scanned)
        self.config = config
        if config.scan_layers:
            self.layers = stacked_layers(config, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.final_norm = RMSNorm(e, config.rms_norm_eps, pd, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, init, (e, v), pd, ("embed", "vocab"))

    def __call__(self, tokens, positions=None, cache=None, mask=None, *, return_hidden=False,
                 skip_logits=False):
        """Return (logits [B,T,V] float32, new cache) and, with return_hidden, final hidden states."""
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        if mask is None:
            width = tokens.shape[1] if cache is None else cache["k"][0].shape[2]
            mask = jnp.ones((tokens.shape[0], width), dtype=bool)
        if positions is None:
            positions = positions_from_mask(mask if cache is None else mask[:, : tokens.shape[1]])
        x = constrain(jnp.take(self.embed[...], valid_tokens(tokens, mask, cache), axis=0).astype(dt),
                      ("batch", "length", "embed"))

        # The model's config (not the one the layers were built with) decides attention and remat:
        # both may be changed on a loaded model.
        attention = resolve_attention(cfg.attention)
        policy = REMAT_POLICIES[cfg.remat]
        cache_end = cache["end"] if cache is not None else None
        if not isinstance(self.layers, nnx.List):  # scanned: one stacked DecoderLayer
            x, new_k, new_v = self._scanned_layers(x, positions, mask, cache, attention, policy)
        else:
            run = _layer_runner(attention)
            if cfg.remat != "none":
                run = nnx.remat(run, policy=policy)
            new_k, new_v = [], []
            for i, layer in enumerate(self.layers):
                cache_kv = (cache["k"][i], cache["v"][i]) if cache is not None else None
                x, cache_kv = run(layer, x, positions, mask, cache_kv, cache_end)
                if cache is not None:
                    new_k.append(cache_kv[0])
                    new_v.append(cache_kv[1])
            new_k, new_v = tuple(new_k), tuple(new_v)
        hidden = self.final_norm(x)

        new_cache = None
        if cache is not None:
            new_cache = {"k": new_k, "v": new_v, "end": cache["end"] + tokens.shape[1]}
        logits = None
        if not skip_logits:
            head = self.embed[...].T if cfg.tie_word_embeddings else self.lm_head[...]
            logits = _dense(hidden, head, out_dtype=jnp.float32)
            logits = constrain(logits, ("batch", "length", "vocab"))
        if return_hidden:
            return logits, new_cache, hidden
        return logits, new_cache

    def _scanned_layers(self, x, positions, mask, cache, attention, policy):
        """The stacked layers as ONE compiled body under `jax.lax.scan` (remat, if any, inside the
        body), walking the stacked [L, ...] cache with them. A plain lax.scan over the split layer
        state, not nnx.scan: the model may be merged outside the trace that calls it (a decode
        while_loop)."""
        layer_def, layer_state = nnx.split(self.layers)
        cache_end = cache["end"] if cache is not None else None

        def body(x, per_layer):
            state, cache_kv = per_layer
            return nnx.merge(layer_def, state)(x, positions, mask, cache_kv, cache_end, attention)

        if self.config.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        cache_kv = (cache["k"], cache["v"]) if cache is not None else None
        x, cache_kv = jax.lax.scan(body, x, (layer_state, cache_kv))
        new_k, new_v = cache_kv if cache is not None else (None, None)
        return x, new_k, new_v

    def vocabulary_logits(self, hidden):
        """Logits [B, V] float32 of final hidden states [B, E]: the head at the positions a sampler
        draws from only (a prefill never materialises [B, P, V])."""
        head = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return jnp.einsum("be,ev->bv", *dot_operands(hidden, in_compute_dtype(head, hidden.dtype)),
                          preferred_element_type=jnp.float32)


def compute_dtype_params(params, dtype):
    """`params` (a pytree) with every floating array wider than the compute `dtype` cast to it.

    The forward pass casts each parameter to the compute dtype where it uses it, so this changes no
    result; a decode loop given these converts no weight at any step, where XLA would otherwise
    convert every weight at every step (the casts are not hoisted out of a while loop). Where the
    CPU multiplies float32 copies of `dtype` operands (`dot_operands`), the cast values are kept
    as float32 (exactly): traced under `weights_hold_compute_values`, the matmuls then take them
    with no conversion at all."""
    dtype = jnp.dtype(dtype)
    as_float32 = uses_cpu_kernels() and not cpu_multiplies_natively(dtype.name)

    def cast(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize > dtype.itemsize:
            return x.astype(dtype).astype(jnp.float32) if as_float32 else x.astype(dtype)
        return x

    return jax.tree.map(cast, params)


# ---- KV cache --------------------------------------------------------------------------------

CACHE_LOGICAL_AXES = ("batch", "kv_heads", "cache_length", "head_dim")


def init_cache(config: Qwen2Config, batch_size: int, max_length: int, dtype=None) -> dict:
    """Preallocated KV cache for `max_length` slots per row, in the compute dtype by default.

    Head-major [B, KVH, S, D] per layer: a head's keys are contiguous, which is the layout the
    attention matmuls read (a slot-major cache costs a transpose per layer and step). Unrolled
    layers get one buffer per layer (slicing a layer out of a stacked [L, ...] array is a copy per
    layer and step on XLA:CPU); scanned layers (`config.scanned`) one stacked [L, B, KVH, S, D]
    array that the scan walks. `map_layers` applies a function per layer to either form."""
    shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)

    def zeros():
        if config.scanned:
            return constrain(jnp.zeros((config.num_hidden_layers,) + shape, dtype),
                             (LAYER_AXIS,) + CACHE_LOGICAL_AXES)
        return tuple(constrain(jnp.zeros(shape, dtype), CACHE_LOGICAL_AXES)
                     for _ in range(config.num_hidden_layers))

    return {"k": zeros(), "v": zeros(), "end": jnp.zeros((), jnp.int32)}
