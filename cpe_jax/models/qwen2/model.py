"""Qwen2 / Qwen2.5 decoder in Flax NNX, numerically matching transformers' `Qwen2ForCausalLM`.

Order: config (with one classmethod per Qwen2.5 size) -> small layers -> model -> KV cache.
Every parameter carries `logical_axes` metadata; `cpe_jax.sharding` maps those names to the mesh.
One forward serves training and KV-cache decoding:

    logits, new_cache = model(tokens, positions, cache, mask)

Without a cache, `mask` is the [B, T] key-validity mask of the tokens themselves. With a cache
({"k", "v": [L, B, KVH, S, D], "end": slots filled}), the T new tokens are written at slots
[end, end + T) and `mask` is the [B, S] validity of every cache slot; attention is causal in slot
order, so cached prompts are left-padded.
"""

import dataclasses
import json
import os
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from cpe_jax.errors import UserError
from cpe_jax.sharding import LOGICAL_AXIS_RULES, logical_to_spec

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
        for field in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, field))
            except TypeError:
                raise UserError(f"{field}={getattr(self, field)!r} is not a dtype") from None

    def replace(self, **changes) -> "Qwen2Config":
        return dataclasses.replace(self, **changes)

    @property
    def num_parameters(self) -> int:
        e, d = self.hidden_size, self.head_dim
        h, kv = self.num_attention_heads, self.num_key_value_heads
        attn = e * h * d + h * d + 2 * (e * kv * d + kv * d) + h * d * e
        layer = attn + 3 * e * self.intermediate_size + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_hidden_layers * layer + e + head

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
        if "rope_theta" not in fields and rope_scaling.get("rope_theta") is not None:
            fields["rope_theta"] = rope_scaling["rope_theta"]  # transformers >= 5 nests it here
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in fields:
                raise UserError(f"{source}: missing field {key!r}")
        fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
        fields.update(overrides)
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


# ---- layers ----------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    def __init__(self, size, eps, param_dtype, *, rngs):
        self.eps = eps
        self.weight = _param(rngs, nnx.initializers.ones, (size,), param_dtype, ("norm",))

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x.astype(dtype)


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

    def __call__(self, x, positions, mask, cache_kv, cache_end, layer_index):
        cfg, dt = self.cfg, x.dtype
        b, t = x.shape[:2]
        kvh, d = cfg.num_key_value_heads, cfg.head_dim
        groups = cfg.num_attention_heads // kvh
        q = jnp.einsum("bte,ehd->bthd", x, self.q_kernel[...].astype(dt)) + self.q_bias[...].astype(dt)
        k = jnp.einsum("bte,ehd->bthd", x, self.k_kernel[...].astype(dt)) + self.k_bias[...].astype(dt)
        v = jnp.einsum("bte,ehd->bthd", x, self.v_kernel[...].astype(dt)) + self.v_bias[...].astype(dt)
        q = constrain(rotary(q, positions, cfg.rope_theta), ("batch", "length", "heads", "head_dim"))
        k = rotary(k, positions, cfg.rope_theta)
        # Head-major [B, KVH, T, D] (the cache layout): both attention matmuls then batch over
        # (b, kv head) and contract the minor dimensions, so the cache is never transposed.
        q = q.reshape(b, t, kvh, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, groups * t, d)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

        query_slots = jnp.arange(t)
        if cache_kv is not None:
            cache_k, cache_v = cache_kv
            start = (layer_index, 0, 0, cache_end, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
            k, v = cache_k[layer_index].astype(dt), cache_v[layer_index].astype(dt)
            query_slots = query_slots + cache_end
            new_cache_kv = (cache_k, cache_v)
        else:
            new_cache_kv = None
        s = k.shape[2]
        allowed = (jnp.arange(s)[None, :] <= query_slots[:, None])[None] & mask[:, None, :].astype(bool)

        scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kvh, groups, t, s) * (d ** -0.5)
        scores = jnp.where(allowed[:, None, None], scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(b, kvh, groups * t, s)
        out = jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kvh, groups, t, d)
        # One [B*T, H*D] x [H*D, E] matmul: the kernel keeps its stored layout.
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, kvh * groups * d)
        o_kernel = self.o_kernel[...].astype(dt)
        out = out @ o_kernel.reshape(-1, o_kernel.shape[-1])
        return out, new_cache_kv


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs):
        e, m, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        init = nnx.initializers.normal(cfg.initializer_range)
        self.gate_kernel = _param(rngs, init, (e, m), pd, ("embed", "mlp"))
        self.up_kernel = _param(rngs, init, (e, m), pd, ("embed", "mlp"))
        self.down_kernel = _param(rngs, init, (m, e), pd, ("mlp", "embed"))

    def __call__(self, x):
        dt = x.dtype
        gate = x @ self.gate_kernel[...].astype(dt)
        up = x @ self.up_kernel[...].astype(dt)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return h @ self.down_kernel[...].astype(dt)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, cache_kv, cache_end, layer_index):
        attn_out, cache_kv = self.attn(self.input_norm(x), positions, mask, cache_kv, cache_end, layer_index)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_norm(x))
        return constrain(x, ("batch", "length", "embed")), cache_kv


def _run_layer(layer, x, positions, mask, cache_kv, cache_end, layer_index):
    return layer(x, positions, mask, cache_kv, cache_end, layer_index)


# ---- model -----------------------------------------------------------------------------------


class Qwen2ForCausalLM(nnx.Module):
    def __init__(self, config: Qwen2Config, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(config.initializer_range)
        e, v, pd = config.hidden_size, config.vocab_size, config.param_dtype
        self.embed = _param(rngs, init, (v, e), pd, ("vocab", "embed"))
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
            width = tokens.shape[1] if cache is None else cache["k"].shape[3]
            mask = jnp.ones((tokens.shape[0], width), dtype=bool)
        if positions is None:
            positions = positions_from_mask(mask if cache is None else mask[:, : tokens.shape[1]])
        x = constrain(jnp.take(self.embed[...], tokens, axis=0).astype(dt), ("batch", "length", "embed"))

        run = _run_layer
        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            run = nnx.remat(_run_layer, policy=policy, static_argnums=(6,))
        cache_kv = (cache["k"], cache["v"]) if cache is not None else None
        cache_end = cache["end"] if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, cache_kv = run(layer, x, positions, mask, cache_kv, cache_end, i)
        hidden = self.final_norm(x)

        new_cache = None
        if cache is not None:
            new_cache = {"k": cache_kv[0], "v": cache_kv[1], "end": cache["end"] + tokens.shape[1]}
        logits = None
        if not skip_logits:
            head = self.embed[...].T if cfg.tie_word_embeddings else self.lm_head[...]
            logits = jnp.einsum("bte,ev->btv", hidden, head.astype(dt), preferred_element_type=jnp.float32)
            logits = constrain(logits, ("batch", "length", "vocab"))
        if return_hidden:
            return logits, new_cache, hidden
        return logits, new_cache


# ---- KV cache --------------------------------------------------------------------------------

CACHE_LOGICAL_AXES = ("layers", "batch", "kv_heads", "cache_length", "head_dim")


def init_cache(config: Qwen2Config, batch_size: int, max_length: int, dtype=None) -> dict:
    """Preallocated KV cache for `max_length` slots per row, in the compute dtype by default.

    Head-major [L, B, KVH, S, D]: a layer's keys of one head are contiguous, which is the layout
    the attention matmuls read (a slot-major cache costs a transpose per layer and step)."""
    shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return {
        "k": constrain(jnp.zeros(shape, dtype), CACHE_LOGICAL_AXES),
        "v": constrain(jnp.zeros(shape, dtype), CACHE_LOGICAL_AXES),
        "end": jnp.zeros((), jnp.int32),
    }
