"""Per-chip memory plan of a training config on a TPU slice, and the smallest mesh that fits.

`cpe-jax plan --config=configs/X.py --tpu=v5p-64` answers "will this OOM, and with which mesh
won't it?" before a pod is rented. Every term is per chip, from the same logical-axis rules
(`cpe_jax.sharding`) that place the real arrays:

- parameters, gradients (param dtype: the train steps accumulate them like the params) and AdamW
  state (optax.adamw: two moments in the param dtype, plus a step count);
- activations kept for the backward pass under the model's remat policy, for the rows of one
  gradient-accumulation chunk on this chip, plus one layer recomputed during the backward pass
  and the attention's rebuilt probabilities;
- float32 logits of that chunk (the head runs over every position, then the response is sliced);
- for PPO/CPE: the critic (a second backbone with its own gradients and optimizer), the reference
  model when KL is on, the passes without gradients (old log-probs and values, reference, pi_e) at
  their real row count and chunking, the samplers (KV cache, decode state, the prefill's attention
  scores over the whole cache) and an in-framework (flax) GRM's critique and expected scores.

Parameters, optimizer state and the GRM stay resident; the passes of a step run one after the
other, so the peak is the resident part plus the largest phase. The transients are counted from
XLA's buffer assignment of the compiled steps, which tests/test_plan.py checks.
"""

import dataclasses
import json
import math
import os
import re
import types
from typing import Optional

from cpe_jax.errors import UserError

GiB = 2**30
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}  # HBM per chip
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}  # v4-N / v5p-N count TensorCores
USABLE_FRACTION = 0.85  # XLA's own buffers, fragmentation and the estimate's error
TENSOR_SIZES = (1, 2, 4, 8)  # tensor parallelism stays within a host's ICI neighbourhood

# Per-token, per-layer activations kept for the backward pass, in units of (hidden E, q/o width
# Hd = heads*head_dim, k/v width KVd, MLP width M, attention row S = heads*key_length over the
# causal query blocks), each a compute-dtype element except the float32 attention scores (S).
# Counted from the residuals JAX saves for each policy (`jax.ad_checkpoint.print_saved_residuals`;
# tests/test_plan.py checks it). The attention's backward pass recomputes its probabilities, so
# without remat no [T, T] scores are kept.
SAVED_PER_TOKEN = {
    "none": dict(E=10, Hd=3, KVd=2, M=6, S=0),  # every intermediate
    "dots": dict(E=2, Hd=2, KVd=2, M=2, S=1),  # projections and attention matmuls
    "dots_no_batch": dict(E=2, Hd=1, KVd=2, M=2, S=0),  # projections only (dots without batch dims)
    "full": dict(E=1, Hd=0, KVd=0, M=0, S=0),  # the layer input only
}
SAVED_OUTSIDE_LAYERS = 3
# A forward pass without gradients: the float32 matmul results one layer holds at once (the MLP's
# gate, up and product; the residual stream in and out, the attention's input and output).
FORWARD_LIVE = dict(E=4, Hd=2, KVd=2, M=3)
SCORE_COPIES = 2  # a forward's float32 attention scores and their masked, scaled form (XLA's buffer assignment)
ATTENTION_BACKWARD_COPIES = 2  # hidden-sized residuals of the embedding, final norm and head


def parse_tpu(name: str):
    """'v5p-64' -> ('v5p', 32 chips); 'v5litepod-16'/'v5e-16' -> ('v5e', 16); 'v6e-8'; 'v4-32' -> ('v4', 16)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise UserError(f"--tpu {name!r}: expected e.g. v4-32, v5p-64, v5e-16 (or v5litepod-16), v6e-8")
    generation = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    cores = int(m.group(2))
    if cores % CORES_PER_CHIP[generation]:
        raise UserError(f"--tpu {name!r}: {generation} slices have {CORES_PER_CHIP[generation]} cores per chip")
    return generation, cores // CORES_PER_CHIP[generation]


def _mesh_like(sizes: dict):
    """What `logical_to_spec` needs of a mesh (its axis sizes), without creating devices."""
    from cpe_jax.sharding import MESH_AXES

    return types.SimpleNamespace(shape={a: int(sizes.get(a, 1)) for a in MESH_AXES})


def shard_fraction(logical_axes, shape, mesh_sizes: dict) -> int:
    """How many ways an array with these logical axes is split on a mesh of these sizes."""
    from cpe_jax.sharding import logical_to_spec

    mesh = _mesh_like(mesh_sizes)
    ways = 1
    for entry in logical_to_spec(logical_axes, shape, mesh):
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            ways *= mesh.shape[axis]
    return ways


def param_table(model_config):
    """[(shape, logical_axes, count)] of a Qwen2 model's parameters (layers counted once, times L)."""
    import jax
    from flax import nnx

    from cpe_jax.models.qwen2.model import Qwen2ForCausalLM

    one_layer = model_config.replace(num_hidden_layers=1)
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(one_layer, rngs=nnx.Rngs(0)))
    flat = jax.tree_util.tree_flatten_with_path(
        nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    table = []
    for path, var in flat:
        in_layer = any(getattr(k, "key", None) == "layers" for k in path)
        table.append((tuple(var.get_value().shape), var.get_metadata()["logical_axes"],
                      model_config.num_hidden_layers if in_layer else 1))
    return table


def param_bytes(model_config, mesh_sizes: dict, dtype: Optional[str] = None) -> float:
    """Bytes per chip of one copy of the model's parameters (or of anything shaped like them)."""
    import numpy as np

    item = np.dtype(dtype or model_config.param_dtype).itemsize
    total = 0.0
    for shape, axes, count in param_table(model_config):
        total += count * math.prod(shape) / shard_fraction(axes, shape, mesh_sizes)
    return total * item


def rows_per_chip(rows: int, length: int, mesh_sizes: dict) -> int:
    """Rows of a [rows, length] batch on each chip under the `batch` rule (prefix of data x fsdp that divides)."""
    return math.ceil(rows / shard_fraction(("batch", "length"), (rows, length), mesh_sizes))


def _per_layer_bytes(model_config, tokens: int, length: int, mesh_sizes: dict, policy: str) -> float:
    import numpy as np

    c = model_config
    widths = _widths(c, mesh_sizes)
    counts = SAVED_PER_TOKEN[policy]
    a = np.dtype(c.dtype).itemsize
    scores = counts["S"] * _scores_bytes(c, tokens, causal_key_fraction(length) * length, mesh_sizes)
    return tokens * sum(counts[k] * widths[k] * a for k in widths) + scores


def causal_key_fraction(length: int) -> float:
    """Mean fraction of the keys a query block of the causal attention multiplies against."""
    from cpe_jax.models.qwen2.model import QUERY_BLOCK, query_blocks

    return sum((stop - start) * stop for start, stop in query_blocks(length, QUERY_BLOCK)) / length**2


def saved_activation_bytes(model_config, rows: int, length: int, mesh_sizes: dict, remat: Optional[str] = None):
    """Bytes per chip of the residuals the backward pass keeps for `rows` x `length` tokens."""
    import numpy as np

    c = model_config
    tokens = rows_per_chip(rows, length, mesh_sizes) * length
    per_layer = _per_layer_bytes(c, tokens, length, mesh_sizes, remat or c.remat)
    outside = SAVED_OUTSIDE_LAYERS * tokens * c.hidden_size * np.dtype(c.dtype).itemsize
    return c.num_hidden_layers * per_layer + outside


def activation_bytes(model_config, rows: int, length: int, mesh_sizes: dict, remat: Optional[str] = None):
    """Saved residuals, plus one layer rebuilt during the backward pass (under remat) and the
    float32 gradient flowing down the residual stream."""
    c = model_config
    remat = remat or c.remat
    tokens = rows_per_chip(rows, length, mesh_sizes) * length
    recompute = _per_layer_bytes(c, tokens, length, mesh_sizes, "none") if remat != "none" else 0.0
    attention_backward = ATTENTION_BACKWARD_COPIES * _scores_bytes(
        c, tokens, causal_key_fraction(length) * length, mesh_sizes)
    residual_grads = 2 * tokens * c.hidden_size * 4
    return saved_activation_bytes(c, rows, length, mesh_sizes, remat) + recompute + attention_backward + residual_grads


def logits_bytes(model_config, rows: int, length: int, mesh_sizes: dict, copies: int = 3) -> float:
    """Float32 logits of a chunk: the values, their softmax and (training) their gradient."""
    v = model_config.vocab_size
    ways = shard_fraction(("vocab",), (v,), mesh_sizes)
    return copies * rows_per_chip(rows, length, mesh_sizes) * length * v / ways * 4


def kv_cache_bytes(model_config, rows: int, length: int, mesh_sizes: dict, dtype=None) -> float:
    """The sampler's KV cache: rows x length x layers x kv_heads x head_dim x (k, v), sharded like the cache."""
    import numpy as np

    c = model_config
    shape = (rows, c.num_key_value_heads, length, c.head_dim)  # per layer
    from cpe_jax.models.qwen2.model import CACHE_LOGICAL_AXES

    ways = shard_fraction(CACHE_LOGICAL_AXES, shape, mesh_sizes)
    return 2 * c.num_hidden_layers * math.prod(shape) / ways * np.dtype(dtype or c.dtype).itemsize


# ---- whole configs ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    kind: str  # "sft" or "ppo"
    mesh: dict
    remat: str
    components: dict  # name -> bytes per chip
    resident: float
    peak: float
    hbm: Optional[float] = None
    usable: Optional[float] = None
    phases: dict = dataclasses.field(default_factory=dict)  # phase -> names of its transient components
    groups: dict = dataclasses.field(default_factory=dict)  # jit -> names of the phases it runs
    peak_phase: Optional[str] = None  # the phase that sets the peak

    def phase_bytes(self, name: str) -> float:
        """Transient bytes of one phase (the sum of its components)."""
        return sum(self.components[k] for k in self.phases[name])

    def group_peak(self, group: str) -> float:
        """Resident bytes plus the largest phase of one jit (e.g. "train step")."""
        return self.resident + max(self.phase_bytes(name) for name in self.groups[group])

    @property
    def fits(self) -> Optional[bool]:
        return None if self.usable is None else self.peak <= self.usable

    def to_dict(self) -> dict:
        gib = lambda x: None if x is None else round(x / GiB, 3)  # noqa: E731
        return {"kind": self.kind, "mesh": self.mesh, "remat": self.remat,
                "per_chip_gib": {k: gib(v) for k, v in self.components.items()},
                "phases_gib": {k: gib(self.phase_bytes(k)) for k in self.phases}, "peak_phase": self.peak_phase,
                "resident_gib": gib(self.resident), "peak_gib": gib(self.peak),
                "hbm_gib": gib(self.hbm), "usable_gib": gib(self.usable), "fits": self.fits}


def sft_plan(model_config, batch_size: int, micro_batch_size: int, max_length: int, mesh: dict) -> Plan:
    """Memory of the SFT step (`cpe_jax.sft.train_step`) for one global batch of max_length tokens."""
    params = param_bytes(model_config, mesh)
    rows = micro_batch_size or batch_size
    comp = {
        "params": params,
        "optimizer (AdamW mu+nu, param dtype)": 2 * params,
        "gradients": params * (2 if rows != batch_size else 1),  # accumulator + one micro-batch's
        "activations": activation_bytes(model_config, rows, max_length, mesh),
        "logits (f32)": logits_bytes(model_config, rows, max_length, mesh),
    }
    resident = comp["params"] + comp["optimizer (AdamW mu+nu, param dtype)"]
    return Plan("sft", dict(mesh), model_config.remat, comp, resident, sum(comp.values()))


def chunk_rows(rows: int, micro_batch_size: int) -> int:
    """Rows of one piece when `rows` are split into micro-batches the way the PPO step splits them
    (`rows // micro_batch_size` equal pieces, at least one; micro_batch_size 0 = one piece)."""
    return rows // max(rows // micro_batch_size, 1) if micro_batch_size else rows


def head_logits_bytes(model_config, rows: int, length: int, response_length: int, mesh_sizes: dict,
                      training: bool = False) -> float:
    """Float32 logits of a pass that runs the head over all `length` positions and keeps the
    response's `response_length`: the full-length values and their response slice; a training
    pass adds the slice's softmax/gradient (the gradient padded back to full length reuses the
    values' buffer). Counted from XLA's buffer assignment of the compiled PPO step."""
    v = model_config.vocab_size
    ways = shard_fraction(("vocab",), (v,), mesh_sizes)
    n = rows_per_chip(rows, length, mesh_sizes)
    return n * (length + response_length * (2 if training else 1)) * v / ways * 4


def forward_layer_bytes(model_config, rows: int, length: int, mesh_sizes: dict) -> float:
    """One layer's intermediates of a forward pass without gradients (no residuals are kept, so
    the layers' transients do not add up): the float32 matmul results live together
    (FORWARD_LIVE) and the causal attention's float32 scores: XLA computes every query block's
    product up front (they depend on q and k alone), then masks them one block at a time."""
    from cpe_jax.models.qwen2.model import QUERY_BLOCK

    c = model_config
    n = rows_per_chip(rows, length, mesh_sizes)
    widths = _widths(c, mesh_sizes)
    live = n * length * sum(FORWARD_LIVE[k] * widths[k] for k in widths) * 4
    every_block = _scores_bytes(c, n * length, causal_key_fraction(length) * length, mesh_sizes)
    last_block = _scores_bytes(c, n * min(QUERY_BLOCK, length), length, mesh_sizes)
    return live + every_block + last_block


def _widths(model_config, mesh_sizes: dict) -> dict:
    """Per-token widths on one chip (hidden E, q/o Hd, k/v KVd, MLP M) under the tensor rule."""
    c = model_config
    t = mesh_sizes.get("tensor", 1)
    split = lambda n: n / t if n % t == 0 else n  # noqa: E731  (tensor-sharded width, as in logical_to_spec)
    return dict(E=c.hidden_size, Hd=split(c.num_attention_heads) * c.head_dim,
                KVd=split(c.num_key_value_heads) * c.head_dim, M=split(c.intermediate_size))


def _scores_bytes(model_config, tokens: int, keys: float, mesh_sizes: dict) -> float:
    """Float32 attention scores of `tokens` query positions against `keys` keys (all heads on a chip)."""
    c = model_config
    t = mesh_sizes.get("tensor", 1)
    heads = c.num_attention_heads / t if c.num_attention_heads % t == 0 else c.num_attention_heads
    return tokens * heads * keys * 4


EXPECTED_SCORE_SLOTS = 32  # cache slots after the critique: score opening, three forced lines, their values
SCORE_VALUES = 11  # candidate values -5..5 scored in one pass over copies of the GRM's cache


def sampler_terms(name: str, model_config, rows: int, prompt_length: int, new_tokens: int, mesh_sizes: dict,
                  decode: bool = True) -> dict:
    """Transients of `sampling.sample` (or a prefill alone): the KV cache of prompt + new slots with
    the decode state, and the prefill's attention, whose scores span every slot of the cache."""
    c = model_config
    slots = prompt_length + new_tokens
    n = rows_per_chip(rows, prompt_length, mesh_sizes)
    state = n * (new_tokens * (4 + 4 + 4) + slots) if decode else 0  # tokens, two log-probs, cache mask
    return {
        f"{name}: KV cache" + (" + decode state" if decode else ""): kv_cache_bytes(c, rows, slots, mesh_sizes) + state,
        f"{name}: prefill attention scores (f32)": SCORE_COPIES * _scores_bytes(
            c, n * prompt_length, slots, mesh_sizes),
        f"{name}: prefill, one layer's intermediates": n * prompt_length * 4 * sum(
            FORWARD_LIVE[k] * w for k, w in _widths(c, mesh_sizes).items()),
    }


OLD_PASS, REFERENCE_PASS, PI_E_PASS = "old log-probs + values pass", "reference pass", "pi_e recompute"
NO_GRAD_PASSES = (OLD_PASS, REFERENCE_PASS, PI_E_PASS)


def ppo_plan(policy_config, config, mesh: dict, grm_config=None) -> Plan:
    """Memory of a PPO/CPE step: rollout, edit rollout, optional flax GRM, then `rl.update.train_step`.

    Everything runs one pass after the other, so each pass is a phase and the peak is the resident
    part plus the largest phase. The train step's passes run in `micro_batch_size`-row pieces
    (0 = one piece): old log-probs and values over all 2B rows, the reference log-probs over the
    same rows when KL is on, the pi_e recompute over the B edit rows at the edit length, then the
    mini-batch updates. A pass without gradients keeps no residuals: its peak is one layer's
    intermediates or, later, the head's logits, never both, so each is a phase of its own.
    Groups name the jits the phases run in: `train step`, `rollout` (host sampling) and `GRM`
    (a flax GRM's judging); the fused step (`grm.fused`) runs all of them in one jit.
    """
    p, r, e = config.ppo, config.rollout, config.edit
    micro = p.micro_batch_size or 0
    rollout_rows = p.prompts_per_step * p.rollouts_per_prompt
    train_rows = 2 * rollout_rows  # originals and (selected or masked) edits
    mini_rows = train_rows // (p.prompts_per_step // p.mini_batch_size)
    response = r.max_response_length
    length = r.max_prompt_length + response
    edit_length = e.max_prompt_length + response
    kl_on = bool(p.kl_coef) and (p.kl_in_reward or p.kl_loss)
    edits = e.get("strategy", "random") != "none"
    c = policy_config

    params = param_bytes(c, mesh)
    comp = {
        "policy params": params,
        "policy optimizer (AdamW mu+nu, param dtype)": 2 * params,
        "critic params": params,  # a second backbone (its lm_head unused) + a scalar head
        "critic optimizer (AdamW mu+nu, param dtype)": 2 * params,
        "reference params": params if kl_on else 0.0,
    }
    if grm_config is not None:
        comp["GRM params"] = param_bytes(grm_config, mesh, grm_config.dtype)
    resident = sum(comp.values())
    phases, groups = {}, {}

    def phase(group, name, terms):
        comp.update(terms)
        phases[name] = list(terms)
        groups.setdefault(group, []).append(name)

    def no_grad_pass(name, rows, pass_length, head_phase=None, models=1):
        layer = forward_layer_bytes(c, rows, pass_length, mesh)
        label = "one layer's intermediates" + (" (policy + critic)" if models == 2 else "")
        phase("train step", f"{name}: layers", {f"{name}: {label}": models * layer})
        head = {f"{name}: logits (f32)": head_logits_bytes(c, rows, pass_length, response, mesh)}
        if head_phase in phases:
            comp.update(head)
            phases[head_phase] += list(head)
        else:
            phase("train step", head_phase or f"{name}: head", head)

    # The policy's and the critic's forward passes over the same rows are independent: XLA
    # interleaves their layers.
    no_grad_pass(OLD_PASS, chunk_rows(train_rows, micro), length, models=2)
    if kl_on:
        # In one piece (no micro-batch loop) the old and reference passes are straight-line code
        # over the same rows, and XLA interleaves them: their logits are live together.
        no_grad_pass(REFERENCE_PASS, chunk_rows(train_rows, micro), length,
                     head_phase=None if micro else f"{OLD_PASS}: head")
    if e.get("pi_e", "recompute") == "recompute":
        no_grad_pass(PI_E_PASS, chunk_rows(rollout_rows, micro), edit_length)
    micro_rows = chunk_rows(mini_rows, micro)
    # Policy and critic gradients (the accumulators plus one micro-batch's), both backbones'
    # activations and the policy's logits of one micro-batch.
    phase("train step", "PPO update", {
        "update: gradients (policy + critic)": 2 * params * (2 if micro_rows != mini_rows else 1),
        "update: activations (policy + critic)": 2 * activation_bytes(c, micro_rows, length, mesh),
        "update: logits (f32)": head_logits_bytes(c, micro_rows, length, response, mesh, training=True),
    })

    phase("rollout", "rollout", sampler_terms("rollout", c, rollout_rows, r.max_prompt_length, response, mesh))
    if edits:
        phase("rollout", "edit rollout",
              sampler_terms("edit rollout", c, rollout_rows, e.max_prompt_length, response, mesh))
    if grm_config is not None:
        g = config.grm
        critique = g.get("max_tokens", 1024)
        grm_prompt = g.get("max_prompt_length", e.max_prompt_length) + response  # prefix + the judged response
        phase("GRM", "GRM critique", sampler_terms("GRM critique", grm_config, rollout_rows, grm_prompt, critique, mesh))
        if g.get("mode", "text") == "expected" or g.get("fused", False):
            scored = grm_prompt + critique
            phase("GRM", "GRM expected scores: prefill", sampler_terms(
                "GRM expected scores", grm_config, rollout_rows, scored, EXPECTED_SCORE_SLOTS, mesh, decode=False))
            cache = kv_cache_bytes(grm_config, rollout_rows, scored + EXPECTED_SCORE_SLOTS, mesh)
            phase("GRM", "GRM expected scores: candidates", {
                "GRM expected scores: cache copies, one per candidate value": SCORE_VALUES * cache,
            })
    totals = {name: sum(comp[k] for k in terms) for name, terms in phases.items()}
    peak_phase = max(totals, key=totals.get)
    return Plan("ppo", dict(mesh), c.remat, comp, resident, resident + totals[peak_phase],
                phases=phases, groups=groups, peak_phase=peak_phase)


def micro_batch_warning(config, plan: Plan, model: Optional[str] = None) -> Optional[str]:
    """With `ppo.micro_batch_size` 0 the passes without gradients run over the whole batch in one
    piece; when one of them sets the peak, name the largest micro-batch size that fits (on a slice
    with known HBM) or that takes them off the peak."""
    if plan.kind != "ppo" or config.ppo.get("micro_batch_size") or not plan.peak_phase.startswith(NO_GRAD_PASSES):
        return None
    p = config.ppo
    mini_rows = 2 * p.prompts_per_step * p.rollouts_per_prompt // (p.prompts_per_step // p.mini_batch_size)
    hbm = plan.hbm / GiB if plan.hbm else None
    suggestion = None
    for size in (m for m in range(mini_rows - 1, 0, -1) if mini_rows % m == 0):
        trial = config.copy_and_resolve_references()
        trial.ppo.micro_batch_size = size
        candidate = plan_config(trial, plan.mesh, model, hbm, remat=plan.remat)
        if candidate.fits if hbm else not candidate.peak_phase.startswith(NO_GRAD_PASSES):
            suggestion = (size, candidate)
            break
    head = (f"warning: ppo.micro_batch_size=0 runs the passes without gradients over the whole batch in one "
            f"piece, and '{plan.peak_phase}' sets the peak ({plan.phase_bytes(plan.peak_phase) / GiB:.2f} GiB)")
    if suggestion is None:
        return head + ("; no micro-batch size fits on this slice" if hbm else "; no micro-batch size changes that")
    size, candidate = suggestion
    verdict = "fits" if hbm else "takes them off the peak"
    return head + f"; --config.ppo.micro_batch_size={size} {verdict} (peak {candidate.peak / GiB:.2f} GiB)"


def _model_config(path_or_preset: str, field: str):
    from cpe_jax.models.qwen2.model import PRESETS, Qwen2Config

    if path_or_preset in PRESETS:
        return PRESETS[path_or_preset]()
    if path_or_preset and os.path.exists(os.path.join(path_or_preset, "config.json")):
        return Qwen2Config.from_pretrained(path_or_preset)
    raise UserError(f"config field {field}: {path_or_preset!r} is neither a local model directory nor one of "
                    f"{', '.join(PRESETS)} (pass --model)")


def plan_config(config, mesh: dict, model: Optional[str] = None, hbm_gib: Optional[float] = None,
                remat: Optional[str] = None) -> Plan:
    """Plan for an SFT (`mode` field) or PPO/CPE (`ppo` field) config on a mesh of the given sizes."""
    is_ppo = "ppo" in config
    source_field = "policy" if is_ppo else "model"
    source = model or config.get("model_preset") or config.get(source_field, "")
    mc = _model_config(source, "model_preset" if config.get("model_preset") and not model else source_field)
    overrides = {"dtype": config.get("dtype") or "bfloat16", "param_dtype": config.get("param_dtype") or "float32"}
    if remat or config.get("remat"):
        overrides["remat"] = remat or config.remat
    mc = mc.replace(**overrides)
    if is_ppo:
        grm = None
        if config.grm.type == "flax":
            grm = _model_config(config.grm.get("model_preset") or config.grm.path, "grm.path")
            grm = grm.replace(dtype=overrides["dtype"])
        plan = ppo_plan(mc, config, mesh, grm)
    else:
        plan = sft_plan(mc, config.batch_size, config.micro_batch_size, config.max_length, mesh)
    if hbm_gib:
        plan.hbm, plan.usable = hbm_gib * GiB, hbm_gib * GiB * USABLE_FRACTION
    return plan


def candidate_meshes(chips: int):
    """Meshes in order of preference: no tensor parallelism first, then the smallest fsdp."""
    for tensor in TENSOR_SIZES:
        if chips % tensor:
            continue
        fsdp = 1
        while fsdp * tensor <= chips:
            if chips % (fsdp * tensor) == 0:
                yield {"data": chips // (fsdp * tensor), "fsdp": fsdp, "tensor": tensor}
            fsdp *= 2


REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # least recomputation first


def propose(config, tpu: str, model: Optional[str] = None) -> dict:
    """The first mesh that fits: the config's remat policy, else the next stronger one; within a
    policy, no tensor parallelism before the smallest fsdp, and batches that divide the mesh."""
    generation, chips = parse_tpu(tpu)
    hbm = HBM_GIB[generation]
    start = REMAT_ORDER.index(config.get("remat") or "none")
    tried = []
    for remat in REMAT_ORDER[start:]:
        for mesh in candidate_meshes(chips):
            plan = plan_config(config, mesh, model, hbm, remat=remat)
            tried.append(plan)
            if plan.fits and _batch_divisible(config, mesh):
                return {"tpu": tpu, "chips": chips, "proposed": plan, "fits": True}
    return {"tpu": tpu, "chips": chips, "proposed": min(tried, key=lambda p: p.peak), "fits": False}


def _batch_divisible(config, mesh) -> bool:
    dp = mesh["data"] * mesh["fsdp"]
    if "ppo" in config:
        return (config.ppo.prompts_per_step * config.ppo.rollouts_per_prompt) % dp == 0
    return config.batch_size % dp == 0


def format_plan(plan: Plan, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"mesh {plan.mesh}  remat={plan.remat}")
    width = max(len(k) for k in list(plan.components) + list(plan.phases))
    for name, value in plan.components.items():
        lines.append(f"  {name:<{width}}  {value / GiB:9.2f} GiB")
    if plan.phases:
        lines.append("  phases, one after the other (the largest sets the peak):")
        for name in plan.phases:
            mark = "  <- peak" if name == plan.peak_phase else ""
            lines.append(f"  {name:<{width}}  {plan.phase_bytes(name) / GiB:9.2f} GiB{mark}")
    lines.append(f"  {'resident':<{width}}  {plan.resident / GiB:9.2f} GiB")
    lines.append(f"  {'peak':<{width}}  {plan.peak / GiB:9.2f} GiB")
    if plan.usable is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(f"  {verdict} in {plan.usable / GiB:.1f} GiB usable of {plan.hbm / GiB:.0f} GiB HBM per chip")
    return "\n".join(lines)


def main(argv) -> int:
    """`cpe-jax plan --config=configs/X.py [--tpu=v5p-64] [--model=qwen2.5-7b|DIR] [--json]`."""
    import argparse

    from cpe_jax.config import parse_config_flags

    p = argparse.ArgumentParser(prog="cpe-jax plan", add_help=False)
    p.add_argument("--tpu", help="slice type, e.g. v5p-64, v4-32, v5e-16, v6e-8: check the fit and propose a mesh")
    p.add_argument("--model", help="preset (qwen2.5-7b, ...) or model directory; default: the config's policy/model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args, rest = p.parse_known_args(argv)
    if not any(a.startswith("--workdir") for a in rest):
        rest = rest + ["--workdir=/nonexistent-unused"]
    config, _ = parse_config_flags(rest, prog="cpe-jax plan")
    mesh = {k: int(v) for k, v in dict(config.get("mesh", {})).items()}
    out = {}
    if args.tpu:
        generation, chips = parse_tpu(args.tpu)
        fixed = math.prod(v for v in mesh.values() if v != -1) or 1
        mesh = {a: (chips // fixed if v == -1 else v) for a, v in mesh.items()}
        configured = plan_config(config, mesh, args.model, HBM_GIB[generation])
        proposal = propose(config, args.tpu, args.model)
        out = {"tpu": args.tpu, "chips": chips, "configured": configured, "proposed": proposal["proposed"]}
    else:
        mesh = {a: (1 if v == -1 else v) for a, v in mesh.items()}
        out = {"configured": plan_config(config, mesh, args.model)}
    warning = micro_batch_warning(config, out["configured"], args.model)
    if args.json:
        out["warnings"] = [warning] if warning else []
        print(json.dumps({k: v.to_dict() if isinstance(v, Plan) else v for k, v in out.items()}, indent=2))
        return 0
    print(format_plan(out["configured"], "configured mesh" + (f" on {args.tpu} ({out['chips']} chips)" if args.tpu else "")))
    if warning:
        print(warning)
    if args.tpu:
        proposed = out["proposed"]
        print()
        print(format_plan(proposed, "proposed mesh (smallest fsdp that fits, tensor only when needed)"
                          if proposed.fits else "nothing fits; the smallest peak is"))
    return 0
