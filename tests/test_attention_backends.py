"""Every attention kernel that runs on CPU (the blocked XLA:CPU kernel, XLA's dot_product_attention,
the Pallas splash and flash kernels in interpret mode), each with the unrolled and the scanned
layer stack, against transformers' PyTorch Qwen2: logits and every parameter's gradient on a
ragged batch padded on both sides (float32, 1e-4); and the sampler's log-probs against the
trainer's."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cpe_jax
from cpe_jax.errors import UserError
from cpe_jax.models.qwen2.model import Qwen2Config, positions_from_mask
from cpe_jax.models.qwen2.params import name_map, to_hf
from tests.helpers import make_hf_qwen2

IMPLEMENTATIONS = ("cpu_blocked", "xla", "splash", "flash")
# Two causal blocks of the CPU kernel and two Pallas blocks after padding; the flash kernel, whose
# interpret mode is the slowest, gets one block.
WIDTH = {"flash": 100}
DEFAULT_WIDTH = 150


def _both_sides_batch(vocab, width, seed=0):
    """Rows left-padded, right-padded, short, and full, in one batch."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, size=(4, width)).astype(np.int32)
    mask = np.zeros((4, width), bool)
    mask[0, 40:] = True
    mask[1, :width - 25] = True
    mask[2, 5:17] = True
    mask[3, :] = True
    return np.where(mask, tokens, 0).astype(np.int32), mask


def _loss(logits, tokens, mask):
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    weight = (mask[:, :-1] & mask[:, 1:]).astype(jnp.float32)
    return -jnp.sum(picked * weight) / jnp.sum(weight)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("attention_backends")
    hf = make_hf_qwen2(path, hidden_size=32, intermediate_size=48, layers=2, heads=4, kv_heads=2,
                       init_scale=0.05)
    return str(path), hf


@pytest.fixture(scope="module")
def references(tiny_model):
    """{width: a two-side ragged batch of that width, its logits and gradients in torch}."""
    cache = {}

    def get(width):
        if width not in cache:
            cache[width] = _reference(*tiny_model, width)
        return cache[width]

    return get


@pytest.fixture(scope="module")
def reference(references):
    return references(DEFAULT_WIDTH)


def _reference(path, hf, width):
    import torch

    tokens, mask = _both_sides_batch(97, width)
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    t_tokens, t_mask = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask)
    hf.zero_grad()
    logits = hf(t_tokens, attention_mask=t_mask.long(), position_ids=torch.tensor(positions, dtype=torch.long)).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logp, -1, t_tokens[:, 1:, None])[..., 0]
    weight = (t_mask[:, :-1] & t_mask[:, 1:]).float()
    loss = -(picked * weight).sum() / weight.sum()
    loss.backward()
    loss = loss.detach()
    grads = {name: p.grad.numpy().copy() for name, p in hf.named_parameters()}
    return dict(path=path, tokens=tokens, mask=mask, logits=logits.detach().numpy(), loss=float(loss),
                grads=grads)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
def test_logits_and_gradients_match_transformers(references, attention, scan_layers):
    reference = references(WIDTH.get(attention, DEFAULT_WIDTH))
    model = cpe_jax.load_model(reference["path"], attention=attention, scan_layers=scan_layers)
    assert model.config.attention == attention and model.config.scan_layers is scan_layers
    assert isinstance(model.layers, nnx.List) is not scan_layers
    if scan_layers and attention != "flash":  # the remat policy applies inside the scanned body
        # (flash's interpret mode runs host callbacks, which remat cannot replay)
        model.config = model.config.replace(remat="full")
    tokens, mask = jnp.asarray(reference["tokens"]), jnp.asarray(reference["mask"])
    graphdef, state = nnx.split(model)

    def loss(state):
        logits, _ = nnx.merge(graphdef, state)(tokens, positions_from_mask(mask), None, mask)
        return _loss(logits, tokens, mask), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    valid = reference["mask"]
    assert np.abs(np.asarray(logits) - reference["logits"])[valid].max() <= 1e-4
    assert float(value) == pytest.approx(reference["loss"], rel=1e-5)
    flat = {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(grads)}
    for layer_index, (hf_name, path, layout) in _rows_with_layer(model.config):
        got = np.asarray(flat[path][...])
        got = to_hf(got if layer_index is None else got[layer_index], layout)
        ref = reference["grads"][hf_name]
        np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), err_msg=hf_name)


def _rows_with_layer(config):
    from cpe_jax.models.qwen2.params import param_rows

    return [(layer, (hf, path, layout)) for hf, path, layout, layer in param_rows(config)]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_sampler_logprobs_equal_trainer_logprobs(reference, scan_layers):
    """Greedy samples through the slot engine (its KV cache stacked when scanned) score the same
    under the trainer's log-prob function (cache-less, `auto` attention) as the sampler reported."""
    from cpe_jax.rl.update import response_logprobs
    from cpe_jax.sampling import Sampler, SamplingParams

    model = cpe_jax.load_model(reference["path"], scan_layers=scan_layers)
    rng = np.random.RandomState(5)
    prompts = [list(rng.randint(3, 97, size=n)) for n in (7, 2, 11)]
    new = 9
    outs = Sampler(model).generate(prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True))
    p = max(map(len, prompts))
    tokens = np.zeros((len(prompts), p + new), np.int32)
    mask = np.zeros_like(tokens, bool)
    for row, (prompt, out) in enumerate(zip(prompts, outs)):
        assert len(out.token_ids) == new
        tokens[row, p - len(prompt):p], mask[row, p - len(prompt):p] = prompt, True
        tokens[row, p:], mask[row, p:] = out.token_ids, True
    graphdef, state = nnx.split(model)
    got = np.asarray(jax.jit(lambda s, t, m: response_logprobs(graphdef, s, t, m, p, new))(state, tokens, mask))
    want = np.array([out.logprobs for out in outs])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_stacked_parameters_export_bit_exact(reference, tmp_path):
    """A scanned model written back to Hugging Face holds the very bytes it was loaded from."""
    from safetensors.numpy import load_file

    from cpe_jax.models.qwen2.params import save_hf

    model = cpe_jax.load_model(reference["path"], scan_layers=True)
    assert model.layers.attn.q_kernel.get_value().shape[0] == 2
    assert model.layers.attn.q_kernel.get_metadata()["logical_axes"][0] is None
    save_hf(model, str(tmp_path))
    original = load_file(f"{reference['path']}/model.safetensors")
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for name, array in original.items():
        np.testing.assert_array_equal(exported[name], array, err_msg=name)
    reloaded = cpe_jax.load_model(str(tmp_path), scan_layers=False)
    assert [row[0] for row in name_map(reloaded.config)] == [row[0] for row in name_map(model.config)]


def test_blocked_kernel_loops_match_dense_attention():
    """The CPU kernel's compiled loops (more query blocks than runs, a partial last block) against
    plain softmax attention, values and gradients, with padding on both sides."""
    from cpe_jax.models.qwen2 import model as qwen2

    b, kvh, groups, d, t = 2, 1, 2, 8, 5 * qwen2.QUERY_BLOCK + 21
    assert len(qwen2.query_runs(t, qwen2.QUERY_BLOCK)) < len(qwen2.query_blocks(t, qwen2.QUERY_BLOCK))
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(b, kvh, t * groups, d), jnp.float32)
    k, v = (jnp.asarray(rng.randn(b, kvh, t, d), jnp.float32) for _ in range(2))
    key_mask = np.ones((b, t), bool)
    key_mask[0, :100], key_mask[1, -300:] = False, False
    key_mask = jnp.asarray(key_mask)
    k, v = qwen2.zero_masked_keys(k, key_mask), qwen2.zero_masked_keys(v, key_mask)
    rows_valid = jnp.repeat(key_mask, groups, axis=1)[:, None, :, None]
    weights = jnp.asarray(rng.randn(b, kvh, t * groups, d), jnp.float32) * rows_valid

    def dense(q, k, v):
        allowed = (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])[None] & key_mask[:, None, :]
        allowed = jnp.repeat(allowed, groups, axis=1)[:, None]
        scores = jnp.where(allowed, jnp.einsum("bkrd,bksd->bkrs", q, k) * d ** -0.5, -1e30)
        return jnp.einsum("bkrs,bksd->bkrd", jax.nn.softmax(scores, axis=-1), v)

    def blocked(q, k, v):
        return qwen2._causal_attention(q, k, v, key_mask, groups, qwen2.QUERY_BLOCK)

    for fn in (dense, blocked):
        fn.value, fn.grads = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * weights), argnums=(0, 1, 2)))(q, k, v)
    assert float(blocked.value) == pytest.approx(float(dense.value), rel=1e-5)
    for got, want in zip(blocked.grads, dense.grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_attention_and_scan_fields(tmp_path):
    with pytest.raises(UserError, match=r"^attention='fast' is not one of"):
        Qwen2Config(attention="fast")
    with pytest.raises(UserError, match=r"^scan_layers='yes'"):
        Qwen2Config(scan_layers="yes")
    config = Qwen2Config(num_hidden_layers=2, attention="xla", scan_layers=True)
    hf = config.to_hf_dict()
    assert "attention" not in hf and "scan_layers" not in hf  # runtime choices, not checkpoint facts
    back = Qwen2Config.from_hf_dict(hf, attention=config.attention, scan_layers=config.scan_layers)
    assert back == config
    assert Qwen2Config().attention == "auto" and Qwen2Config().scanned is False  # CPU defaults


def test_bad_attention_value_exits_2_naming_the_field(reference, capsys):
    from cpe_jax.errors import exit_on_user_error

    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(lambda: cpe_jax.load_model(reference["path"], attention="cudnn2"))()
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attention='cudnn2'" in err[0]


@pytest.mark.parametrize("flags, want", [
    ("fpu sse avx2 avx512f avx512_bf16", "float32"),
    ("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "bfloat16"),
    ("fpu sse avx2", "float32"),
])
def test_cpu_features_decide_the_cpu_compute_dtype(tmp_path, flags, want, caplog, monkeypatch):
    from cpe_jax import hardware

    monkeypatch.delenv(hardware.CPU_DTYPE_ENV, raising=False)  # the suite pins it (conftest)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n")
    with caplog.at_level("INFO", logger="cpe_jax.hardware"):
        prefers = hardware.cpu_prefers_bfloat16(str(cpuinfo))
    assert ("bfloat16" if prefers else "float32") == want
    assert f"CPU compute dtype: {want}" in caplog.text
    assert hardware.cpu_features(str(cpuinfo))["avx2"] is True
    assert hardware.cpu_flags(str(tmp_path / "absent")) == frozenset()


def test_cpu_dtype_env_overrides_the_features(tmp_path, monkeypatch):
    from cpe_jax import hardware
    from cpe_jax.errors import UserError

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 amx_bf16\n")
    for value, want in (("float32", False), ("bfloat16", True)):
        monkeypatch.setenv(hardware.CPU_DTYPE_ENV, value)
        hardware.cpu_prefers_bfloat16.cache_clear()
        assert hardware.cpu_prefers_bfloat16(str(cpuinfo)) is want
    monkeypatch.setenv(hardware.CPU_DTYPE_ENV, "fp8")
    hardware.cpu_prefers_bfloat16.cache_clear()
    with pytest.raises(UserError, match="CPE_JAX_CPU_DTYPE='fp8' must be float32 or bfloat16"):
        hardware.cpu_prefers_bfloat16(str(cpuinfo))
    hardware.cpu_prefers_bfloat16.cache_clear()


def test_empty_dtype_follows_the_cpu_features(monkeypatch):
    """`dtype=""` (a config's "choose") follows the CPU features; no dtype stays float32 on CPU."""
    from cpe_jax import hardware
    from cpe_jax.models.qwen2.params import default_compute_dtype

    for has_amx, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(hardware, "cpu_prefers_bfloat16", lambda has_amx=has_amx: has_amx)
        assert default_compute_dtype("") == want
        assert default_compute_dtype(None) == "float32"
        assert default_compute_dtype("bfloat16") == "bfloat16"


def test_commands_configs_set_attention_and_scan_layers():
    import ml_collections

    from cpe_jax.models.qwen2.params import load_options

    assert load_options(ml_collections.ConfigDict({"attention": "", "scan_layers": None})) == {}
    assert load_options(ml_collections.ConfigDict({"attention": "xla", "scan_layers": True})) == {
        "attention": "xla", "scan_layers": True}
    assert load_options(ml_collections.ConfigDict({"lr": 1.0})) == {}
    with pytest.raises(UserError, match=r"^config field attention: must be one of .*got 'fast'$"):
        load_options(ml_collections.ConfigDict({"attention": "fast"}))


@pytest.mark.parametrize("flags, native", [("fpu avx2 avx512f avx512_bf16", False), ("fpu avx2 amx_bf16 amx_tile", True)])
def test_bfloat16_matmuls_run_on_float32_copies_without_amx(tmp_path, monkeypatch, flags, native):
    """Without AMX, XLA:CPU's bfloat16 dots are slower than float32 ones: every matmul of a
    bfloat16 model (forward and backward) then multiplies float32 copies of its bfloat16
    operands, which changes no product; with AMX it multiplies bfloat16 operands."""
    from cpe_jax import hardware
    from cpe_jax.models.qwen2 import model as qwen2

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"flags\t\t: {flags}\n")
    assert hardware.cpu_multiplies_natively("bfloat16", str(cpuinfo)) is native
    assert hardware.cpu_multiplies_natively("float16", str(cpuinfo)) is False
    assert hardware.cpu_multiplies_natively("float32", str(cpuinfo)) is True
    monkeypatch.setattr(qwen2, "cpu_multiplies_natively", lambda name: hardware.cpu_multiplies_natively(name, str(cpuinfo)))

    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, dtype="bfloat16")
    graphdef, state = nnx.split(qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(2, 8)), jnp.int32)

    def loss(state):
        logits, _ = nnx.merge(graphdef, state)(tokens)
        return jnp.mean(logits)

    dots = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
    assert len(dots) > 20  # forward and backward of every dense layer, attention and the head
    want = "bfloat16" if native else "float32"
    assert all(a == b == want for a, b in dots), sorted(set(dots))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 96)).astype(jnp.bfloat16)
    w = rng.standard_normal((96, 40)).astype(jnp.bfloat16)
    got = jax.jit(lambda x, w: jnp.dot(*qwen2.dot_operands(x, w), preferred_element_type=jnp.float32))(x, w)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(np.asarray(got), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("native", [False, True])
def test_weights_cast_once_give_the_same_logits(monkeypatch, native):
    """`compute_dtype_params` keeps bfloat16 values as float32 where the CPU multiplies float32
    copies; under `weights_hold_compute_values` (the engine) the model multiplies them as they are.
    Logits equal those of the float32 parameters rounded at every use, bit for bit."""
    from cpe_jax.models.qwen2 import model as qwen2

    monkeypatch.setattr(qwen2, "cpu_multiplies_natively", lambda name: native or name == "float32")
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, dtype="bfloat16")
    graphdef, params = nnx.split(qwen2.Qwen2ForCausalLM(config, rngs=nnx.Rngs(0)))
    cast = qwen2.compute_dtype_params(params, "bfloat16")
    kernel = cast["layers"][0]["mlp"]["up_kernel"][...]
    assert kernel.dtype == (jnp.bfloat16 if native else jnp.float32)
    np.testing.assert_array_equal(np.asarray(kernel, np.float32),
                                  np.asarray(params["layers"][0]["mlp"]["up_kernel"][...].astype(jnp.bfloat16), np.float32))
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 64, size=(3, 8)), jnp.int32)

    def logits(params):
        out, _ = nnx.merge(graphdef, params)(tokens)
        return out

    want = jax.jit(logits)(params)
    with qwen2.weights_hold_compute_values():
        got = jax.jit(logits)(cast)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
