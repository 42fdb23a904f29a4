"""Padding can never change a result: masked tokens, whatever their ids, and masked keys and values,
whatever their contents, leave every valid output bitwise unchanged; special ids outside the
vocabulary are dropped at load; out-of-range ids exit 2; a non-finite step stops the run unsaved."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import cpe_jax
from cpe_jax.cli import main as cli_main
from cpe_jax.errors import UserError
from cpe_jax.models.qwen2.model import init_cache, positions_from_mask
from cpe_jax.sampling import Sampler, SamplingParams
from cpe_jax.sharding import make_mesh

VOCAB = 256
QWEN_SPECIAL = 151643  # Qwen's bos/eos, outside a small vocabulary


def _save_default_config_model(path, vocab_size=VOCAB, **special):
    """A tiny random model from transformers' default `Qwen2Config`: no special ids unless given."""
    cfg = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, initializer_range=0.15, **special)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["no_special_ids", "qwen_ids_outside_vocab"])
def default_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    special = {} if request.param == "no_special_ids" else dict(bos_token_id=QWEN_SPECIAL, eos_token_id=QWEN_SPECIAL)
    hf = _save_default_config_model(path, **special)
    return str(path), hf


def _map_params(state, name, fn):
    """`state` with `fn` applied to the parameters whose path names `name` outside the layers."""
    def apply(path, x):
        key = jax.tree_util.keystr(path)
        return fn(x) if name in key and "layers" not in key else x
    return jax.tree_util.tree_map_with_path(apply, state)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, VOCAB, size=n)] for n in lengths]


def _hf_greedy(hf, prompt, steps):
    """Greedy tokens and their log-probs by a plain loop over transformers' forward (no padding)."""
    ids, tokens, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
            token = int(torch.argmax(logits))
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return tokens, logprobs


def test_out_of_vocab_special_ids_are_dropped_with_one_warning(default_model, caplog):
    path, _ = default_model
    with caplog.at_level(logging.WARNING):
        model = cpe_jax.load_model(path)
    assert model.config.bos_token_id is None and model.config.eos_token_id is None
    warnings = [r.getMessage() for r in caplog.records if "outside the vocabulary" in r.getMessage()]
    if "qwen_ids" in path:
        assert len(warnings) == 1
        assert f"bos_token_id={QWEN_SPECIAL}" in warnings[0] and f"eos_token_id={QWEN_SPECIAL}" in warnings[0]
    else:
        assert warnings == []
    sampler = Sampler(model)
    assert sampler.eos_token_ids == () and 0 <= sampler.pad_token_id < VOCAB


def test_an_eos_list_keeps_its_in_vocab_ids(tmp_path):
    from cpe_jax.models.qwen2.model import Qwen2Config

    hf = json.loads(transformers.Qwen2Config(vocab_size=VOCAB).to_json_string())
    hf.update(eos_token_id=[7, QWEN_SPECIAL], bos_token_id=None)
    config = Qwen2Config.from_hf_dict(hf)
    assert config.eos_token_id == (7,) and config.bos_token_id is None
    assert config.to_hf_dict()["bos_token_id"] is None  # null stays null through export


@pytest.mark.parametrize("with_mesh", [False, True])
def test_greedy_equals_transformers_on_ragged_prompts(default_model, with_mesh):
    path, hf = default_model
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}) if with_mesh else None
    sampler = Sampler(cpe_jax.load_model(path, mesh=mesh), mesh=mesh)
    prompts = _prompts([3, 11, 1, 20])
    outs = sampler.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = _hf_greedy(hf, prompt, 10)
        assert out.token_ids == tokens
        np.testing.assert_allclose(out.logprobs, logprobs, atol=1e-4)


def _ragged_rows(lengths, width, pad):
    """Right-padded rows [B, width] with `pad` (an array or an id) at the masked positions."""
    tokens = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for r, (n, row) in enumerate(zip(lengths, _prompts(lengths, seed=1))):
        tokens[r, :n], mask[r, :n] = row, True
    return np.where(mask, tokens, pad).astype(np.int32), mask


def _pad_variants(shape, seed=0):
    """Ids a caller may leave at masked positions: 0, random in range, out of range both ways."""
    rng = np.random.default_rng(seed)
    return [0, rng.integers(0, VOCAB, shape), rng.integers(VOCAB, 10 * VOCAB, shape),
            rng.integers(-VOCAB, 0, shape), QWEN_SPECIAL]


@pytest.mark.parametrize("with_mesh", [False, True])
def test_trainer_logprobs_equal_transformers_whatever_the_pad_ids(default_model, with_mesh):
    from cpe_jax.rl.update import response_logprobs

    path, hf = default_model
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}) if with_mesh else None
    graphdef, state = nnx.split(cpe_jax.load_model(path, mesh=mesh))
    lengths, width, prompt_length = [12, 5, 16, 9], 16, 4
    clean, mask = _ragged_rows(lengths, width, 0)
    with torch.no_grad():
        logits = hf(torch.tensor(clean), attention_mask=torch.tensor(mask.astype(np.int64))).logits.double()
    want = torch.log_softmax(logits, -1)[:, prompt_length - 1:-1].gather(
        -1, torch.tensor(clean[:, prompt_length:, None]).long())[..., 0].numpy()
    valid = mask[:, prompt_length:]
    fn = jax.jit(lambda s, t, m: response_logprobs(graphdef, s, t, m, prompt_length, width - prompt_length))
    first = None
    for pad in _pad_variants(clean.shape):
        tokens, _ = _ragged_rows(lengths, width, pad)
        if mesh is not None:
            with jax.set_mesh(mesh):
                got = np.asarray(fn(state, tokens, mask))
        else:
            got = np.asarray(fn(state, tokens, mask))
        np.testing.assert_allclose(got[valid], want[valid], atol=1e-4)
        first = got if first is None else first
        np.testing.assert_array_equal(got[valid], first[valid])  # bitwise: pads are invisible


def test_critic_values_and_gradients_ignore_masked_tokens(default_model):
    from cpe_jax.models.heads import ValueModel

    path, _ = default_model
    critic = ValueModel.from_policy(cpe_jax.load_model(path), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(critic)
    lengths, width = [7, 16, 2], 16
    _, mask = _ragged_rows(lengths, width, 0)

    def loss(s, tokens):
        values = nnx.merge(graphdef, s)(tokens, positions_from_mask(mask), mask)
        return jnp.sum(jnp.where(mask, values, 0.0) ** 2), values

    grad_fn = jax.jit(jax.grad(loss, has_aux=True))
    reference = None
    for pad in _pad_variants(mask.shape, seed=3):
        tokens, _ = _ragged_rows(lengths, width, pad)
        grads, values = jax.device_get(grad_fn(state, tokens))
        assert np.all(np.isfinite(values[mask]))
        leaves = [np.asarray(x) for x in jax.tree.leaves(grads)]
        assert all(np.all(np.isfinite(x)) for x in leaves)
        if reference is None:
            reference = (values, leaves)
            continue
        np.testing.assert_array_equal(values[mask], reference[0][mask])
        for a, b in zip(leaves, reference[1]):
            np.testing.assert_array_equal(a, b)


def test_nan_keys_and_values_at_masked_positions_change_nothing(default_model):
    """Training kernel: a NaN embedding row for the id masked positions are fed (0) makes their keys
    and values NaN; cache kernels: NaN or huge values written into masked cache slots. Valid
    outputs stay bitwise equal in both."""
    path, _ = default_model
    model = cpe_jax.load_model(path)
    graphdef, state = nnx.split(model)
    lengths, width = [9, 16, 4], 16
    tokens, mask = _ragged_rows(lengths, width, 0)
    assert not np.any(tokens[mask] == 0)

    forward = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, None, None, mask)[0])
    clean = np.asarray(forward(state))
    poisoned = _map_params(state, "embed", lambda x: x.at[0].set(jnp.nan))
    np.testing.assert_array_equal(np.asarray(forward(poisoned))[mask], clean[mask])

    # Left-padded prompts in a cache, then one decode step and a two-token prefill step.
    b, p, slots = len(lengths), width, width + 4
    left = np.zeros_like(tokens)
    left_mask = np.zeros_like(mask)
    for r, n in enumerate(lengths):
        left[r, p - n:], left_mask[r, p - n:] = tokens[r, :n], True

    def mask_with(new):  # the prompt's slots and those of the `new` tokens written next
        return np.concatenate([left_mask, np.ones((b, new), bool), np.zeros((b, slots - p - new), bool)], axis=1)

    def after_prefill(s):
        model = nnx.merge(graphdef, s)
        cache = init_cache(model.config, b, slots)
        return model(left, positions_from_mask(left_mask), cache, mask_with(0))[1]

    def continue_from(s, cache, new_tokens):
        model = nnx.merge(graphdef, s)
        positions = left_mask.sum(axis=1)[:, None] + np.arange(new_tokens.shape[1])[None]
        return model(new_tokens, positions, cache, mask_with(new_tokens.shape[1]))[0]

    cache = jax.jit(after_prefill)(state)
    step = jax.jit(continue_from)
    for new in (np.full((b, 1), 5, np.int32), np.full((b, 2), 7, np.int32)):
        want = np.asarray(step(state, cache, new))
        for poison in (jnp.nan, jnp.inf, 1e30):
            def spoil(layers):
                return tuple(jnp.where(jnp.asarray(mask_with(0))[:, None, :, None], x, poison) for x in layers)
            spoiled = dict(cache, k=spoil(cache["k"]), v=spoil(cache["v"]))
            np.testing.assert_array_equal(np.asarray(step(state, spoiled, new)), want)


def test_fused_grm_expected_scores_ignore_pad_ids(tmp_path):
    """The GRM's expected scores of left-padded prefixes equal those of each prefix alone."""
    from cpe_jax.reward.flax_grm import build_score_tables, expected_scores
    from cpe_jax.engine import bucket_size
    from test_tokenizer import write_tiny_tokenizer
    from cpe_jax.tokenizer import load_tokenizer

    write_tiny_tokenizer(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    _save_default_config_model(tmp_path, vocab_size=len(tokenizer), eos_token_id=QWEN_SPECIAL)
    model = cpe_jax.load_model(str(tmp_path))
    graphdef, state = nnx.split(model)
    tables = build_score_tables(tokenizer, vocab_size=model.config.vocab_size)
    with pytest.raises(UserError, match=r"the GRM score line .* token id \d+ is outside the model's vocabulary \[0, 8\)"):
        build_score_tables(tokenizer, vocab_size=8)
    prefixes = _prompts([5, 12, 2])
    score = jax.jit(lambda s, t, m: expected_scores(graphdef, s, t, m, tables))
    alone = [score(state, np.asarray([p], np.int32), np.ones((1, len(p)), bool)) for p in prefixes]
    width = bucket_size(max(map(len, prefixes)), 16)
    for pad in (0, len(tokenizer) + 3, QWEN_SPECIAL, -1):
        tokens = np.full((len(prefixes), width), pad, np.int32)
        mask = np.zeros((len(prefixes), width), bool)
        for r, p in enumerate(prefixes):
            tokens[r, width - len(p):], mask[r, width - len(p):] = p, True
        out = score(state, tokens, mask)
        for r, single in enumerate(alone):
            for name in ("helpfulness", "personalization", "naturalness"):
                assert np.isfinite(float(out[name][r]))
                np.testing.assert_allclose(float(out[name][r]), float(single[name][0]), atol=1e-4)


# ---- out-of-range ids are user errors ----------------------------------------------------------


def _run_cli(argv, capsys):
    try:
        code = cli_main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_sampler_rejects_out_of_range_prompt_ids(default_model):
    path, _ = default_model
    sampler = Sampler(cpe_jax.load_model(path))
    for bad in (VOCAB, -1):
        with pytest.raises(UserError, match=rf"prompt 1: token id {bad} is outside"):
            sampler.generate([[1, 2], [3, bad]], SamplingParams(max_tokens=2))


def test_generate_exits_2_naming_the_line_and_the_id(default_model, tmp_path, capsys):
    path, _ = default_model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [1, 2]}) + "\n"
                       + json.dumps({"prompt_token_ids": [3, VOCAB + 5]}) + "\n")
    code, err = _run_cli(["generate", "--model", path, "--prompts", str(prompts),
                          "--out", str(tmp_path / "out.jsonl"), "--max-tokens", "2"], capsys)
    assert code == 2 and len(err) == 1
    assert f"{prompts}:2: token id {VOCAB + 5} is outside" in err[0]
    assert not (tmp_path / "out.jsonl").exists()


@pytest.fixture(scope="module")
def small_vocab_policy(tmp_path_factory):
    """A PersonaWorld tokenizer beside a model whose vocabulary is 64 ids smaller: text can encode
    to ids the model does not have."""
    from tests.helpers import make_persona_world_policy

    path = tmp_path_factory.mktemp("small_vocab")
    tokenizer = make_persona_world_policy(path)
    cfg = json.loads((path / "config.json").read_text())
    small = len(tokenizer) - 64
    from tests.helpers import make_hf_qwen2

    make_hf_qwen2(path, vocab_size=small, hidden_size=32, intermediate_size=64, layers=2, heads=4,
                  kv_heads=2, init_scale=0.02)
    assert json.loads((path / "config.json").read_text())["vocab_size"] == small != cfg["vocab_size"]
    return str(path), tokenizer, small


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_sft_and_dpo_exit_2_naming_the_row_with_an_unknown_id(small_vocab_policy, tmp_path, capsys, command):
    path, tokenizer, small = small_vocab_policy
    high = next(t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]) if i >= small)
    text = tokenizer.convert_tokens_to_string([high])
    rows = [{"prompt": "hello", "response": "fine"}, {"prompt": "hello", "response": text}]
    if command == "dpo":
        rows = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": "no"} for r in rows]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = os.path.join(os.path.dirname(__file__), "..", "configs", f"{command}.py")
    code, err = _run_cli([command, f"--config={config}", f"--workdir={tmp_path / 'run'}", f"--config.model={path}",
                          f"--config.data.path={data}", "--config.batch_size=2", "--config.mesh.data=2",
                          "--config.progress=False"], capsys)
    assert code == 2 and len(err) == 1
    assert f"{data}:2: token id" in err[0] and f"outside the model's vocabulary [0, {small})" in err[0]


def test_train_exits_2_naming_the_prompt_row_with_an_unknown_id(small_vocab_policy, tmp_path):
    from cpe_jax.rl.trainer import Trainer
    from tests.test_trainer import smoke_config

    path, tokenizer, small = small_vocab_policy
    trainer = Trainer(smoke_config(path, total_steps=1), str(tmp_path))
    with pytest.raises(UserError, match=rf"prompt row \d+: token id \d+ is outside the model's vocabulary \[0, {small}\)"):
        trainer.train_one_step()


# ---- non-finite numbers stop the run -----------------------------------------------------------


def test_a_nonfinite_step_is_counted_and_stops_the_run_unsaved(tmp_path):
    from cpe_jax.metrics import read_metrics
    from cpe_jax.rl.trainer import Trainer
    from tests.helpers import make_persona_world_policy
    from tests.test_trainer import smoke_config

    policy = tmp_path / "policy"
    make_persona_world_policy(policy)
    workdir = tmp_path / "run"
    trainer = Trainer(smoke_config(str(policy), total_steps=3, save_every=1), str(workdir))
    step, metrics = trainer.train_one_step()
    assert metrics["numerics/nonfinite"] == 0
    trainer.save(force=True)
    trainer.state = trainer.state.replace(critic=_map_params(trainer.state.critic, "head", lambda x: x * jnp.nan))
    with pytest.raises(UserError, match=r"step 2: \d+ non-finite .*numerics/nonfinite.*latest checkpoint is step 1"):
        trainer.run(progress=False)
    assert trainer.checkpointer.latest_step() == 1
    rows = read_metrics(str(workdir))
    assert rows[-1]["step"] == 2 and rows[-1]["numerics/nonfinite"] > 0
