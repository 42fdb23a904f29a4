"""HF <-> Orbax conversion: bit-exact round trip, sharded restore, clear errors for bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import cpe_jax
from cpe_jax.checkpoints import restore_model, save_model
from cpe_jax.errors import UserError
from cpe_jax.models.qwen2.params import save_hf
from cpe_jax.sharding import make_mesh
from tests.helpers import hf_logits, make_hf_qwen2, ragged_batch


def _all_tensors(model_dir):
    tensors = {}
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(model_dir, name)))
    return tensors


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    make_hf_qwen2(path, vocab_size=131, layers=3, heads=4, kv_heads=2)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cpe_jax.cli", *args], capture_output=True, text=True)


def test_round_trip_hf_orbax_hf_is_bit_exact(hf_dir, tmp_path):
    orbax_dir, back_dir = tmp_path / "orbax", tmp_path / "back"
    r = _cli("convert", "--from-hf", str(hf_dir), "--to-orbax", str(orbax_dir))
    assert r.returncode == 0, r.stderr
    r = _cli("convert", "--from-orbax", str(orbax_dir), "--to-hf", str(back_dir), "--max-shard-size", "40KB")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(back_dir / "model.safetensors.index.json")  # small shards force an index
    original, restored = _all_tensors(hf_dir), _all_tensors(back_dir)
    assert sorted(original) == sorted(restored)
    for name in original:
        assert original[name].dtype == restored[name].dtype
        np.testing.assert_array_equal(original[name], restored[name], err_msg=name)
    assert (back_dir / "tokenizer_config.json").exists()
    assert (back_dir / "generation_config.json").exists()

    import transformers

    reloaded = transformers.Qwen2ForCausalLM.from_pretrained(back_dir).eval()
    reference = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir).eval()
    tokens, mask = ragged_batch(131, [5, 3], 5, left_pad=True)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask), hf_logits(reference, tokens, mask))


def test_bfloat16_checkpoint_round_trip(tmp_path):
    src = tmp_path / "bf16"
    make_hf_qwen2(src, dtype="bfloat16", tie=True)
    model = cpe_jax.load_model(str(src))
    assert model.config.param_dtype == "bfloat16" and model.config.tie_word_embeddings
    save_hf(model, tmp_path / "out")
    original, restored = _all_tensors(src), _all_tensors(tmp_path / "out")
    assert sorted(original) == sorted(restored)
    for name in original:
        np.testing.assert_array_equal(original[name].view(np.uint16), restored[name].view(np.uint16))


def test_orbax_restore_into_requested_sharding(hf_dir, tmp_path):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    save_model(cpe_jax.load_model(str(hf_dir)), tmp_path / "ckpt")
    model = restore_model(str(tmp_path / "ckpt"), mesh=mesh)
    q = model.layers[0].attn.q_kernel[...]  # [embed, heads, head_dim]: embed over fsdp, heads over tensor
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1] // 2, q.shape[2])
    reference = cpe_jax.load_model(str(hf_dir))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(reference.layers[0].attn.q_kernel[...]))


def test_missing_path_is_named(tmp_path):
    r = _cli("convert", "--from-hf", str(tmp_path / "nope"), "--to-orbax", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "nope" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_truncated_safetensors_names_the_file(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = _cli("convert", "--from-hf", str(broken), "--to-orbax", str(tmp_path / "o"))
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_other_architecture_names_model_type(hf_dir, tmp_path):
    other = tmp_path / "llama"
    shutil.copytree(hf_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="model_type 'llama'"):
        cpe_jax.load_model(str(other))


def _rewrite_weights(src, dst, edit):
    shutil.copytree(src, dst)
    from safetensors.numpy import save_file

    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def test_wrong_shape_and_missing_tensor_are_named(hf_dir, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"

    def reshape(t):
        t[name] = t[name][:-1]

    def drop(t):
        del t[name]

    _rewrite_weights(hf_dir, tmp_path / "shape", reshape)
    with pytest.raises(UserError, match=f"tensor {name} has shape"):
        cpe_jax.load_model(str(tmp_path / "shape"))
    _rewrite_weights(hf_dir, tmp_path / "missing", drop)
    r = _cli("convert", "--from-hf", str(tmp_path / "missing"), "--to-orbax", str(tmp_path / "o"))
    assert r.returncode == 2 and f"missing tensor {name}" in r.stderr


def test_export_names_eos_in_generation_config_and_the_models_positions_in_the_tokenizer(tmp_path):
    from flax import nnx

    from cpe_jax.models.qwen2.model import Qwen2Config, Qwen2ForCausalLM

    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096, "eos_token": "x"}))
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         eos_token_id=7, bos_token_id=None)
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))  # built in the framework: no generation_config
    save_hf(model, tmp_path / "out", tokenizer_dir=str(tokenizer_dir))
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation == {"eos_token_id": 7}  # bos stays null: not invented
    tokenizer_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tokenizer_config == {"model_max_length": 1024, "eos_token": "x"}
    assert json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["model_max_length"] == 4096
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["bos_token_id"] is None and hf_config["eos_token_id"] == 7

    import transformers

    loaded = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert loaded.eos_token_id == 7 and loaded.bos_token_id is None
