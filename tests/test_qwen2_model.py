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
        # A decoding step sees what its mask allows: the slots written so far and its own (as in
        # transformers, whose attention mask covers the past and the current token).
        written = slot_mask & (jnp.arange(12) <= t)[None, :]
        logits, cache = model(jnp.asarray(tokens[:, t:t + 1]), positions[:, t:t + 1], cache, written)
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
    # Recomputation may fuse (and so round) differently: float32 noise only.
    for remat in ("full", "dots"):
        for a, b in zip(grads["none"], grads[remat]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


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


def _masked_next_token_loss(logits, tokens, mask):
    """Mean next-token log-loss over valid (position, next position) pairs."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = (mask[:, :-1] & mask[:, 1:]).astype(jnp.float32)
    return -jnp.sum(picked * weight) / jnp.sum(weight)


@pytest.mark.parametrize("left_pad", [True, False])
def test_gradients_match_pytorch_autograd(tmp_path, left_pad):
    """Every parameter's gradient against torch autograd on a ragged batch longer than one causal
    attention block (the custom backward pass of attention and of the 2-D matmuls)."""
    import torch
    from flax import nnx

    from cpe_jax.models.qwen2.model import QUERY_BLOCK
    from cpe_jax.models.qwen2.params import name_map, to_hf

    hf = make_hf_qwen2(tmp_path, layers=2, heads=4, kv_heads=2, init_scale=0.05)
    model = cpe_jax.load_model(str(tmp_path))
    width = 2 * QUERY_BLOCK + 37
    tokens, mask = ragged_batch(model.config.vocab_size, [width, width - 50, QUERY_BLOCK - 3], width,
                                left_pad=left_pad, seed=3)
    graphdef, state = nnx.split(model)

    def loss(state):
        m = nnx.merge(graphdef, state)
        logits, _ = m(jnp.asarray(tokens), positions_from_mask(jnp.asarray(mask)), None, jnp.asarray(mask))
        return _masked_next_token_loss(logits, jnp.asarray(tokens), jnp.asarray(mask))

    ours_loss, grads = jax.jit(jax.value_and_grad(loss))(state)
    flat = {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(grads)}

    hf.zero_grad()
    t_tokens, t_mask = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask)
    logits = hf(t_tokens, attention_mask=t_mask.long(),
                position_ids=torch.tensor(np.asarray(positions_from_mask(jnp.asarray(mask))), dtype=torch.long)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logp, -1, t_tokens[:, 1:, None])[..., 0]
    weight = (t_mask[:, :-1] & t_mask[:, 1:]).float()
    torch_loss = -(picked * weight).sum() / weight.sum()
    torch_loss.backward()
    assert float(ours_loss) == pytest.approx(float(torch_loss.detach()), rel=1e-5)
    torch_grads = dict(hf.named_parameters())
    for hf_name, path, layout in name_map(model.config):
        ref = torch_grads[hf_name].grad.numpy()
        got = to_hf(np.asarray(flat[path][...]), layout)
        scale = np.abs(ref).max()
        assert scale > 0, hf_name
        np.testing.assert_allclose(got, ref, atol=2e-4 * scale, err_msg=hf_name)


def test_bfloat16_compute_gradients_follow_float32(tmp_path):
    """bfloat16 compute (float32 parameters) runs its matmuls and their gradients in bfloat16:
    the gradient direction agrees with float32's."""
    from flax import nnx

    make_hf_qwen2(tmp_path, layers=2, init_scale=0.05)
    tokens, mask = ragged_batch(97, [200, 150], 200, left_pad=True, seed=4)
    grads = {}
    for dtype in ("float32", "bfloat16"):
        model = cpe_jax.load_model(str(tmp_path), dtype=dtype, param_dtype="float32")
        graphdef, state = nnx.split(model)

        def loss(state):
            logits, _ = nnx.merge(graphdef, state)(jnp.asarray(tokens), None, None, jnp.asarray(mask))
            return _masked_next_token_loss(logits, jnp.asarray(tokens), jnp.asarray(mask))

        grads[dtype] = jax.jit(jax.grad(loss))(state)
    for a, b in zip(jax.tree.leaves(grads["float32"]), jax.tree.leaves(grads["bfloat16"])):
        assert b.dtype == jnp.float32
        a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
        cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cosine > 0.98
