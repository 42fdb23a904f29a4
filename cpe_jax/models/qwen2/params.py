"""Hugging Face <-> Flax parameters for Qwen2: ONE name/shape table, used in both directions.

Loading streams tensor by tensor from `model.safetensors` or a sharded index: each tensor is
memory-mapped, converted to our layout and placed straight into its target sharding, so host
memory holds about one tensor at a time. A scanned model (`Qwen2Config.scan_layers`) keeps each
layer parameter as one stacked [L, ...] array: the same table maps layer i's tensor to index i of
it, written in place on the devices at load and read back one layer at a time at export.

Export writes safetensors shards (<= max_shard_size) with an index, `config.json`,
`generation_config.json` whenever the model has EOS ids, and the tokenizer files, with
`model_max_length` set to the model's positions.
"""

import json
import logging
import os
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from cpe_jax.errors import UserError, require_path
from cpe_jax.models.qwen2.model import Qwen2Config, Qwen2ForCausalLM, StaticDict
from cpe_jax.sharding import fetch_global, logical_sharding

log = logging.getLogger(__name__)

# (Hugging Face name, our parameter path, layout). `{i}` is the layer index.
PARAM_TABLE = (
    ("model.embed_tokens.weight", "embed", "same"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_kernel", "heads_in"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q_bias", "heads_bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k_kernel", "heads_in"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.k_bias", "heads_bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v_kernel", "heads_in"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.v_bias", "heads_bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_kernel", "heads_out"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_kernel", "linear"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_kernel", "linear"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_kernel", "linear"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight", "same"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight", "same"),
    ("model.norm.weight", "final_norm.weight", "same"),
    ("lm_head.weight", "lm_head", "linear"),
)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def to_flax(hf_array, layout, flax_shape):
    """Convert a Hugging Face tensor (torch Linear weights are [out, in]) to our layout."""
    if layout == "same":
        return hf_array
    if layout == "linear":
        return hf_array.T
    if layout == "heads_in":  # [H*D, E] -> [E, H, D]
        return hf_array.T.reshape(flax_shape)
    if layout == "heads_bias":  # [H*D] -> [H, D]
        return hf_array.reshape(flax_shape)
    if layout == "heads_out":  # [E, H*D] -> [H, D, E]
        return hf_array.T.reshape(flax_shape)
    raise ValueError(layout)


def to_hf(flax_array, layout):
    """Inverse of `to_flax`."""
    if layout == "same":
        return flax_array
    if layout == "linear":
        return flax_array.T
    if layout == "heads_in":  # [E, H, D] -> [H*D, E]
        return flax_array.reshape(flax_array.shape[0], -1).T
    if layout == "heads_bias":
        return flax_array.reshape(-1)
    if layout == "heads_out":  # [H, D, E] -> [E, H*D]
        return flax_array.reshape(-1, flax_array.shape[-1]).T
    raise ValueError(layout)


def hf_shape(layout, flax_shape):
    return to_hf(np.empty(flax_shape, dtype=np.int8), layout).shape


def param_rows(config: Qwen2Config):
    """[(hf_name, our_path, layout, layer)] for this config, layers expanded, tied head dropped.
    `layer` is the index into a stacked parameter (scanned layers), else None."""
    rows = []
    for hf_name, path, layout in PARAM_TABLE:
        if path == "lm_head" and config.tie_word_embeddings:
            continue
        if "{i}" not in hf_name:
            rows.append((hf_name, path, layout, None))
        elif config.scanned:
            rows += [(hf_name.format(i=i), path.replace("{i}.", ""), layout, i)
                     for i in range(config.num_hidden_layers)]
        else:
            rows += [(hf_name.format(i=i), path.format(i=i), layout, None)
                     for i in range(config.num_hidden_layers)]
    return rows


def name_map(config: Qwen2Config):
    """[(hf_name, our_path, layout)] for this config (see `param_rows`)."""
    return [row[:3] for row in param_rows(config)]


def layer_shape(var, layer):
    """The shape one HF tensor fills in `var`: a stacked parameter's per-layer slice, else all of it."""
    shape = tuple(var.get_value().shape)
    return shape if layer is None else shape[1:]


def _path_str(path):
    return ".".join(str(p) for p in path)


def abstract_model(config: Qwen2Config):
    """(graphdef, {path: Variable with ShapeDtypeStruct}) without allocating any weights."""
    abstract = nnx.eval_shape(lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = {_path_str(path): var for path, var in nnx.to_flat_state(state)}
    return graphdef, state, flat


def param_sharding(var, mesh, *, per_layer=False):
    """The sharding of `var` on `mesh` (one device without a mesh); with per_layer, of one layer's
    slice of a stacked parameter."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    axes, shape = var.get_metadata()["logical_axes"], var.get_value().shape
    if per_layer:
        axes, shape = axes[1:], shape[1:]
    return logical_sharding(mesh, axes, shape)


@partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer, value):
    """stacked [L, ...] with index `layer` replaced by value [...], in place (donated)."""
    return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), layer, 0)


def _empty_stacked(var, mesh):
    value = var.get_value()
    sharding = param_sharding(var, mesh)
    return jax.jit(lambda: jnp.zeros(value.shape, value.dtype), out_shardings=sharding)()


def place(host_array, sharding):
    """Put a host array into `sharding`, each device copying only its own slice."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])


# ---- safetensors reading -----------------------------------------------------------------


class SafetensorsReader:
    """Tensor-by-tensor access to `model.safetensors` or a sharded checkpoint with an index."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        index = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(f"{index}: not a safetensors index ({e})") from None
            self.files = {name: os.path.join(model_dir, fname) for name, fname in weight_map.items()}
        elif os.path.exists(single):
            self.files = {name: single for name in self._open(single).keys()}
        else:
            if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(model_dir)):
                raise UserError(f"{model_dir}: only pickle weights found; cpe_jax reads safetensors only")
            raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
        self._handles = {}

    @staticmethod
    def _open(path):
        if not os.path.exists(path):
            raise UserError(f"missing safetensors file {path}")
        try:
            return safe_open(path, framework="numpy")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: corrupt or truncated safetensors file ({e})") from None

    def __contains__(self, name):
        return name in self.files

    def get(self, name):
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        try:
            return self._handles[path].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read tensor {name} ({e})") from None

    def first_dtype(self):
        name = next(iter(self.files))
        return self.get(name).dtype


def _progress(iterable, total, desc, enabled):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor")


def default_compute_dtype(dtype=None):
    """The compute dtype for `dtype`: itself when named; None (the library default) is bfloat16
    on TPU and float32 elsewhere (exact results on CPU); "" (a config's "choose for me") is
    bfloat16 on TPU and GPU and, on CPU, bfloat16 only where the CPU has native bfloat16 matmuls
    (`cpe_jax.hardware.cpu_prefers_bfloat16`, which logs the choice), float32 elsewhere."""
    if dtype:
        return dtype
    backend = jax.default_backend()
    if backend == "tpu":
        return "bfloat16"
    if dtype is None:
        return "float32"
    if backend == "gpu":
        return "bfloat16"
    from cpe_jax.hardware import cpu_prefers_bfloat16

    return "bfloat16" if cpu_prefers_bfloat16() else "float32"


def runtime_overrides(attention=None, scan_layers=None):
    """Qwen2Config fields a load may set that no checkpoint stores (None = the config's default)."""
    out = {}
    if attention is not None:
        out["attention"] = attention
    if scan_layers is not None:
        out["scan_layers"] = scan_layers
    return out


def load_options(config) -> dict:
    """`load_model` keyword arguments from a command's ml_collections config: its optional fields
    `attention` ("" or absent = auto) and `scan_layers` (None or absent = by backend), checked
    against the config field names (exit 2 naming the field)."""
    from cpe_jax.config import check
    from cpe_jax.models.qwen2.attention import ATTENTION_CHOICES

    attention = config.get("attention") or None
    check(attention is None or attention in ATTENTION_CHOICES, "attention",
          f"must be one of {', '.join(map(repr, ATTENTION_CHOICES))}, got {attention!r}")
    scan_layers = config.get("scan_layers")
    check(scan_layers in (None, True, False), "scan_layers", f"must be true, false or None, got {scan_layers!r}")
    return runtime_overrides(attention, scan_layers)


def load_hf(model_dir, *, dtype=None, param_dtype=None, mesh=None, progress=False, attention=None,
            scan_layers=None):
    """Load a Hugging Face Qwen2 directory into a sharded `Qwen2ForCausalLM`."""
    require_path(model_dir, "model directory")
    reader = SafetensorsReader(model_dir)
    stored_dtype = jnp.dtype(reader.first_dtype()).name
    config = Qwen2Config.from_pretrained(
        model_dir,
        dtype=default_compute_dtype(dtype),
        param_dtype=param_dtype or stored_dtype,
        **runtime_overrides(attention, scan_layers),
    )
    config = config.replace(scan_layers=config.scanned)
    graphdef, state, flat = abstract_model(config)
    stacked = {}  # path -> the stacked array being filled layer by layer
    rows = param_rows(config)
    for hf_name, path, layout, layer in _progress(rows, len(rows), f"loading {model_dir}", progress):
        if hf_name not in reader:
            raise UserError(f"{model_dir}: missing tensor {hf_name}")
        var = flat[path]
        tensor = reader.get(hf_name)
        shape = layer_shape(var, layer)
        want = hf_shape(layout, shape)
        if tuple(tensor.shape) != tuple(want):
            raise UserError(
                f"{model_dir}: tensor {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(want)}"
            )
        host = np.asarray(to_flax(tensor, layout, shape)).astype(var.get_value().dtype)
        if layer is None:
            var.set_value(place(host, param_sharding(var, mesh)))
            continue
        if path not in stacked:
            stacked[path] = _empty_stacked(var, mesh)
        stacked[path] = _set_layer(stacked[path], layer, place(host, param_sharding(var, mesh, per_layer=True)))
    for path, value in stacked.items():
        flat[path].set_value(value)
    model = nnx.merge(graphdef, state)
    generation_config = _read_json(os.path.join(model_dir, "generation_config.json"))
    model.generation_config = StaticDict(generation_config) if generation_config else None
    model.source_dir = os.path.abspath(model_dir)
    return model


def _read_json(path):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None


# ---- export ------------------------------------------------------------------------------


def _parse_size(size):
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", str(size).upper())
    if not m:
        raise UserError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'")
    return int(float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2)])


def save_hf(model, out_dir, *, tokenizer_dir=None, max_shard_size="5GB", dtype=None, progress=False):
    """Write `model` as a Hugging Face directory that transformers' Qwen2ForCausalLM loads."""
    config = model.config
    limit = _parse_size(max_shard_size)
    _, state = nnx.split(model)
    flat = {_path_str(path): var for path, var in nnx.to_flat_state(state)}
    out_dtype = jnp.dtype(dtype or config.param_dtype)
    rows = param_rows(config)

    # Plan shards from shapes first so file names know the shard count.
    shards, current, current_size = [], [], 0
    for row in rows:
        size = int(np.prod(layer_shape(flat[row[1]], row[3]))) * out_dtype.itemsize
        if current and current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(row)
        current_size += size
    shards.append(current)

    is_writer = jax.process_index() == 0
    if is_writer:
        os.makedirs(out_dir, exist_ok=True)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map, total = {}, 0
    bar = _progress(None, len(rows), f"writing {out_dir}", progress) if progress else None
    for fname, shard in zip(names, shards):
        tensors = {}
        for hf_name, path, layout, layer in shard:
            value = flat[path].get_value()
            host = fetch_global(value if layer is None else value[layer]).astype(out_dtype)
            tensors[hf_name] = np.ascontiguousarray(to_hf(host, layout))
            weight_map[hf_name] = fname
            total += tensors[hf_name].nbytes
            if bar is not None:
                bar.update(1)
        if is_writer:
            save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        del tensors
    if bar is not None:
        bar.close()
    if not is_writer:
        return
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = out_dtype.name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    generation_config = export_generation_config(model)
    if generation_config:
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(generation_config, f, indent=2)
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        copy_tokenizer_files(tokenizer_dir, out_dir)
    set_model_max_length(out_dir, config.max_position_embeddings)


def export_generation_config(model):
    """generation_config.json for an export: the loaded one, with the model's EOS ids when it has
    none; else, whenever the model has EOS ids, one that names them (servers such as vLLM stop on
    them). None when there is nothing to say."""
    config = model.config
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    out = dict(getattr(model, "generation_config", None) or {})
    if eos is not None and out.get("eos_token_id") is None:
        out["eos_token_id"] = eos
    if config.bos_token_id is not None and out and "bos_token_id" not in out:
        out["bos_token_id"] = config.bos_token_id
    return out or None


def set_model_max_length(out_dir, max_positions):
    """Make `model_max_length` in OUT/tokenizer_config.json the model's positions (a copied Qwen
    tokenizer says 131072 or 4096 whatever model it serves)."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    if tokenizer_config.get("model_max_length") == max_positions:
        return
    tokenizer_config["model_max_length"] = int(max_positions)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def copy_tokenizer_files(src_dir, dst_dir):
    """Copy the tokenizer files that exist in `src_dir` (local or gs://) to `dst_dir`."""
    from etils import epath

    src_dir, dst_dir = epath.Path(os.fspath(src_dir)), epath.Path(os.fspath(dst_dir))
    if not src_dir.is_dir() or str(src_dir) == str(dst_dir):
        return
    for name in TOKENIZER_FILES:
        if (src_dir / name).exists():
            (src_dir / name).copy(dst_dir / name, overwrite=True)

