"""Meshes: a (data 2, fsdp 2, tensor 2) mesh gives one device's logits, with weights really sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cpe_jax
from cpe_jax.errors import UserError
from cpe_jax.models.qwen2.model import positions_from_mask
from cpe_jax.sharding import logical_to_spec, make_mesh, shard_batch
from tests.helpers import make_hf_qwen2, ragged_batch


def test_make_mesh_sizes_and_errors():
    mesh = make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert make_mesh({"tensor": 2}).devices.size == 2  # fixed sizes may use a subset
    with pytest.raises(UserError, match="needs 16 devices"):
        make_mesh({"data": 4, "tensor": 4})
    with pytest.raises(UserError, match="'model'"):
        make_mesh({"model": 8})


def test_indivisible_dims_stay_replicated():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec(("embed", "kv_heads"), (64, 1), mesh) == jax.sharding.PartitionSpec("fsdp", None)
    assert logical_to_spec(("batch", None), (6, 3), mesh) == jax.sharding.PartitionSpec("data", None)


def test_mesh_logits_equal_single_device(tmp_path):
    make_hf_qwen2(tmp_path, vocab_size=128, hidden_size=64, heads=4, kv_heads=2)
    single = cpe_jax.load_model(str(tmp_path))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = cpe_jax.load_model(str(tmp_path), mesh=mesh)

    up = sharded.layers[0].mlp.up_kernel[...]
    assert len({d.id for d in up.sharding.device_set}) == 8
    assert up.addressable_shards[0].data.shape == (32, 48)  # embed/fsdp, mlp/tensor
    embed = sharded.embed[...]
    assert embed.addressable_shards[0].data.shape == (64, 32)  # vocab/tensor, embed/fsdp

    tokens, mask = ragged_batch(128, [8, 5, 3, 8], 8, left_pad=True)
    ref, _ = single(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), None, jnp.asarray(mask))

    graphdef, state = nnx.split(sharded)
    batch = shard_batch(mesh, {"tokens": tokens, "mask": mask})

    @jax.jit
    def forward(state, tokens, mask):
        logits, _ = nnx.merge(graphdef, state)(tokens, positions_from_mask(mask), None, mask)
        return logits

    with jax.set_mesh(mesh):
        logits = forward(state, batch["tokens"], batch["mask"])
    assert logits.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(ref)[mask], atol=1e-5)
