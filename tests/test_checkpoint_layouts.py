"""A model checkpoint restores into either layer layout (scanned or unrolled), bit for bit."""

import json

import numpy as np
import pytest
from flax import nnx

import cpe_jax
from cpe_jax.checkpoints import MODEL_METADATA, restore_model, save_model
from cpe_jax.models.qwen2.params import default_compute_dtype
from helpers import make_hf_qwen2


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_layouts")
    make_hf_qwen2(path, hidden_size=32, intermediate_size=48, layers=3)
    return path


def _params(model):
    _, state = nnx.split(model)
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("saved_scan,restored_scan", [(True, False), (False, True), (True, True)])
def test_checkpoint_restores_into_requested_layout_bit_exact(hf_dir, tmp_path, saved_scan, restored_scan):
    saved = cpe_jax.load_model(hf_dir, dtype="float32", scan_layers=saved_scan)
    save_model(saved, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / MODEL_METADATA).read_text())["scan_layers"] is saved_scan
    restored = cpe_jax.load_model(tmp_path / "ckpt", dtype="float32", scan_layers=restored_scan)
    assert restored.config.scan_layers is restored_scan
    reference = _params(cpe_jax.load_model(hf_dir, dtype="float32", scan_layers=restored_scan))
    got = _params(restored)
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key].view(np.uint8), value.view(np.uint8), err_msg=key)


def test_empty_dtype_resolves_by_hardware(hf_dir, tmp_path):
    save_model(cpe_jax.load_model(hf_dir, dtype="float32", scan_layers=False), tmp_path / "ckpt")
    assert restore_model(tmp_path / "ckpt", dtype="").config.dtype == default_compute_dtype()
