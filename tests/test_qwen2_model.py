"""Our Flax Qwen2 against transformers' PyTorch Qwen2ForCausalLM (float32, max |diff| <= 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpe_jax
from cpe_jax.models.qwen2.model import PRESETS, Qwen2Config, init_cache, positions_from_mask
from tests.helpers import hf_logits, make_hf_qwen2, ragged_batch

CONFIGS = {
    "untied_gqa2": dict(),
    "tied_mha": dict(tie=True, kv_heads=4),
    "gqa4_odd_head_dim": dict(heads=8, kv_heads=2, head_dim=12, rope_theta=1e6, rms_eps=1e-5),
    "mqa_big_theta": dict(hidden_size=48, heads=6, kv_heads=1, rope_theta=5e5, layers=3, tie=True),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_qwen2(path, **CONFIGS[request.param])
    return hf, cpe_jax.load_model(str(path))


@pytest.mark.parametrize("left_pad", [True, False])
def test_logits_match_transformers(pair, left_pad):
    hf, model = pair
    tokens, mask = ragged_batch(model.config.vocab_size, [9, 5, 1, 7], 9, left_pad=left_pad)
    ref = hf_logits(hf, tokens, mask)
    logits, cache = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), None, jnp.asarray(mask))
    assert cache is None
    diff = np.abs(np.asarray(logits) - ref)[mask]
    assert np.abs(ref).max() > 1.0  # peaky enough that a wrong layer would show
    assert diff.max() <= 1e-4


def test_cached_decoding_matches_full_forward(pair):
    """Prefill a left-padded prompt into the cache, then feed tokens one by one."""
    _, model = pair
    tokens, mask = ragged_batch(model.config.vocab_size, [6, 3], 10, left_pad=True, seed=1)
    prompt_len = 6
    full_mask = np.ones_like(mask)
    full_mask[:, :prompt_len] = mask[:, :prompt_len]  # padding only inside the prompt
    ref, _ = model(jnp.asarray(tokens), positions_from_mask(jnp.asarray(full_mask)), None, jnp.asarray(full_mask))

    cache = init_cache(model.config, 2, 12)
    slot_mask = np.zeros((2, 12), bool)
    slot_mask[:, :10] = full_mask
    slot_mask = jnp.asarray(slot_mask)
    positions = positions_from_mask(slot_mask)
    logits, cache = model(jnp.asarray(tokens[:, :prompt_len]), positions[:, :prompt_len], cache, slot_mask)
    steps = [logits]
    for t in range(prompt_len, 10):
        logits, cache = model(jnp.asarray(tokens[:, t:t + 1]), positions[:, t:t + 1], cache, slot_mask)
        steps.append(logits)
    assert int(cache["end"]) == 10
    got = np.concatenate([np.asarray(s) for s in steps], axis=1)
    np.testing.assert_allclose(got[full_mask], np.asarray(ref)[full_mask], atol=1e-4)


def test_hidden_states_and_jit(pair):
    _, model = pair
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        m = nnx.merge(graphdef, state)
        return m(tokens, return_hidden=True)

    tokens = jnp.ones((2, 4), jnp.int32)
    logits, _, hidden = forward(state, tokens)
    assert hidden.shape == (2, 4, model.config.hidden_size)
    eager, _ = model(tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(eager), atol=1e-5)


def test_remat_policies_give_same_gradients(tmp_path):
    make_hf_qwen2(tmp_path, layers=2)
    from flax import nnx

    grads = {}
    for remat in ("none", "full", "dots"):
        model = cpe_jax.load_model(str(tmp_path))
        model.config = model.config.replace(remat=remat)
        for layer in model.layers:
            layer.attn.cfg = model.config
        graphdef, state = nnx.split(model)

        def loss(state):
            logits, _ = nnx.merge(graphdef, state)(jnp.arange(6, dtype=jnp.int32)[None])
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

        grads[remat] = jax.tree.leaves(jax.jit(jax.grad(loss))(state))
    for remat in ("full", "dots"):
        for a, b in zip(grads["none"], grads[remat]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_presets_parameter_counts():
    """The seven Qwen2.5 presets have the published parameter counts (to 1%)."""
    published = {"qwen2.5-0.5b": 0.494e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-3b": 3.09e9,
                 "qwen2.5-7b": 7.62e9, "qwen2.5-14b": 14.7e9, "qwen2.5-32b": 32.5e9,
                 "qwen2.5-72b": 72.7e9}
    for name, make in PRESETS.items():
        assert abs(make().num_parameters / published[name] - 1) < 0.01, name


def test_config_errors():
    from cpe_jax.errors import UserError

    with pytest.raises(UserError, match="model_type 'llama'"):
        Qwen2Config.from_hf_dict({"model_type": "llama", "vocab_size": 10})
    with pytest.raises(UserError, match="num_key_value_heads"):
        Qwen2Config(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(UserError, match="remat"):
        Qwen2Config(remat="sometimes")
