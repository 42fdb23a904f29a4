import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from scipy import stats

import cpe_jax
from cpe_jax import cli
from cpe_jax.errors import UserError
from cpe_jax.engine import bucket_size, categorical, first_argmax
from cpe_jax.sampling import (
    Sampler,
    SamplingParams,
    process_logits,
    row_keys,
    sample_tokens,
)
from test_tokenizer import write_tiny_tokenizer

VOCAB = 320
EOS = 2  # <|im_end|> of the tiny tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Tiny random HF Qwen2 (with a tokenizer) saved once for the whole module."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.15, eos_token_id=EOS, bos_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return transformers.Qwen2ForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def sampler(model_dir):
    return Sampler.from_pretrained(model_dir)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, VOCAB, size=n)] for n in lengths]


def _hf_logits(hf_model, prompt, generated):
    """Raw next-token logits at every generated position (teacher forcing, no padding)."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = hf_model(ids).logits[0].numpy()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_probs(logits, temperature, top_k, top_p):
    """Processed distribution, written as a plain per-row NumPy loop."""
    out = []
    for row in np.asarray(logits, np.float64):
        z = row / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        if top_k:  # top-k first, then the nucleus of the renormalized top-k distribution (vLLM)
            p[order[top_k:]] = 0.0
            p /= p.sum()
        keep = np.zeros_like(p, bool)
        mass = 0.0
        for tok in order:
            if p[tok] == 0:
                break
            keep[tok] = True
            mass += p[tok]
            if top_p < 1 and mass >= top_p:
                break
        q = np.where(keep, p, 0.0)
        out.append(q / q.sum())
    return np.array(out)


# ---- exactness against transformers ----------------------------------------------------------


def test_greedy_matches_transformers_on_ragged_batch(sampler, hf_model):
    prompts = _prompts([3, 9, 17, 30])
    outs = sampler.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf_model.generate(
            input_ids=ids, attention_mask=attention, max_new_tokens=12, do_sample=False,
            pad_token_id=0, eos_token_id=EOS, output_logits=True, return_dict_in_generate=True,
        )
    ref_logprobs = torch.log_softmax(torch.stack(ref.logits, 1), -1).numpy()
    assert [o.prompt_token_ids for o in outs] == prompts
    for r, out in enumerate(outs):
        expected = ref.sequences[r, width:].tolist()
        if EOS in expected:
            expected = expected[: expected.index(EOS) + 1]
        assert out.token_ids == expected
        assert out.finish_reason == ("stop" if expected[-1] == EOS else "length")
        want = [ref_logprobs[r, t, tok] for t, tok in enumerate(expected)]
        np.testing.assert_allclose(out.logprobs, want, atol=1e-3)
        assert out.sampling_logprobs == [0.0] * len(expected)  # argmax has probability 1
        assert out.text == sampler.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6)])
def test_samples_stay_in_truncated_set_and_logprobs_match(sampler, hf_model, top_k, top_p):
    prompts = _prompts([4, 11, 7])
    params = SamplingParams(max_tokens=10, temperature=0.7, top_k=top_k, top_p=top_p, seed=3,
                            ignore_eos=True)
    for out in sampler.generate(prompts, params):
        logits = _hf_logits(hf_model, out.prompt_token_ids, out.token_ids)
        processed = _reference_probs(logits, 0.7, top_k, top_p)
        raw = _log_softmax(logits)
        for t, tok in enumerate(out.token_ids):
            assert processed[t, tok] > 0, f"token {tok} sampled outside the truncated set"
        np.testing.assert_allclose(
            out.logprobs, raw[np.arange(len(out.token_ids)), out.token_ids], atol=1e-3
        )
        np.testing.assert_allclose(
            out.sampling_logprobs,
            np.log(processed[np.arange(len(out.token_ids)), out.token_ids]),
            atol=1e-3,
        )


# ---- sampling math ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.3, 3, 1.0), (0.8, 0, 0.7),
                                  (1.0, 4, 0.8)]
)
def test_processed_distribution_matches_reference_and_frequencies(temperature, top_k, top_p):
    logits = np.array([[2.0, 1.5, 1.0, 0.7, 0.2, -0.5, -1.0, 0.1]], np.float32)
    expected = _reference_probs(logits, temperature, top_k, top_p)[0]
    processed = process_logits(jnp.asarray(logits), temperature, top_k, top_p)
    np.testing.assert_allclose(jax.nn.softmax(processed, axis=-1)[0], expected, atol=1e-6)

    draws = 20000
    keys = row_keys(7, np.arange(draws))
    tokens, _, sampling_logprobs = jax.jit(
        lambda k, l: sample_tokens(k, l, temperature, top_k, top_p)
    )(keys, jnp.broadcast_to(jnp.asarray(logits), (draws, logits.shape[1])))
    tokens = np.asarray(tokens)
    counts = np.bincount(tokens, minlength=logits.shape[1])
    assert np.all(counts[expected == 0] == 0)
    support = expected > 0
    _, p_value = stats.chisquare(counts[support], draws * expected[support])
    assert p_value > 1e-3
    np.testing.assert_allclose(sampling_logprobs, np.log(expected[tokens]), atol=1e-5)


def test_first_argmax_and_categorical_equal_jax():
    """The fast argmax and Gumbel draw are jnp.argmax and jax.random.categorical, ties and NaNs too."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(64, 300)).astype(np.float32)  # many ties
    x[5, 17] = np.nan
    x[6, [40, 9]] = np.nan
    x[7] = -np.inf
    x[8, :] = 1.0
    np.testing.assert_array_equal(jax.jit(first_argmax)(x), jnp.argmax(x, axis=-1))
    keys = row_keys(3, np.arange(64))
    logits = jnp.asarray(rng.normal(size=(64, 300)).astype(np.float32) * 4)
    logits = logits.at[:, 100:].set(-jnp.inf)  # a truncated distribution
    np.testing.assert_array_equal(jax.jit(categorical)(keys, logits),
                                  jax.vmap(jax.random.categorical)(keys, logits))


def test_sampling_params_validation_names_the_field():
    for field, value in [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5),
                         ("top_k", -1), ("n", 0)]:
        with pytest.raises(UserError, match=field):
            SamplingParams(**{field: value})


def test_buckets():
    assert [bucket_size(n, 16) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    assert bucket_size(3, 1, 4) == 4 and bucket_size(5, 1, 4) == 8 and bucket_size(1, 1, 4) == 4


# ---- stopping, n, compile reuse --------------------------------------------------------------


def test_stop_tokens_and_ignore_eos(model_dir, sampler):
    prompt = _prompts([6], seed=5)
    greedy = sampler.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    tokens = greedy[0].token_ids
    assert len(tokens) == 12 and greedy[0].finish_reason == "length"
    stop = tokens[4]
    first = tokens.index(stop)
    out = sampler.generate(prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop]))
    assert out[0].token_ids == tokens[: first + 1] and out[0].finish_reason == "stop"

    as_eos = Sampler(sampler_model(model_dir), eos_token_ids=(stop,))
    out = as_eos.generate(prompt, SamplingParams(max_tokens=12, temperature=0))
    assert out[0].token_ids == tokens[: first + 1] and out[0].finish_reason == "stop"
    out = as_eos.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert out[0].token_ids == tokens and out[0].finish_reason == "length"


def sampler_model(model_dir, mesh=None):
    return cpe_jax.load_model(str(model_dir), mesh=mesh)


def test_n_samples_per_prompt_are_prompt_major_and_reuse_compiled_code(sampler, caplog):
    prompts = _prompts([5, 9, 12], seed=1)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=2, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="cpe_jax.engine"):
        outs = sampler.generate(prompts, params)
    assert [(o.prompt_index, o.index) for o in outs] == [(i, j) for i in range(3) for j in range(2)]
    assert all(o.prompt_token_ids == prompts[o.prompt_index] for o in outs)
    assert outs[0].token_ids != outs[1].token_ids  # independent samples of one prompt
    # One prefill per prompt (3 prompts in a bucket of 4), copied to its 2 samples (6 rows -> 8).
    assert "compiling engine admission: 4 prompts x 16 tokens into 8 rows" in caplog.text

    # Same buckets (6 rows -> 8, lengths <= 16), other prompts in the batch: no new compile, and
    # the untouched prompts get exactly the same samples (per-row keys).
    compiles = sampler.compile_count
    other = [prompts[0], _prompts([14], seed=9)[0], prompts[2]]
    again = sampler.generate(other, params)
    assert sampler.compile_count == compiles
    for r in (0, 1, 4, 5):
        assert again[r].token_ids == outs[r].token_ids
        np.testing.assert_allclose(again[r].logprobs, outs[r].logprobs, atol=1e-5)
    assert again[2].token_ids != outs[2].token_ids

    # A longer prompt falls in a new bucket: one more admission and one more decode program.
    sampler.generate([_prompts([20])[0]], SamplingParams(max_tokens=8, temperature=1.0, seed=11,
                                                         n=2, ignore_eos=True))
    assert sampler.compile_count == compiles + 2


def test_prompt_errors(sampler):
    with pytest.raises(UserError, match="prompt 1 is empty"):
        sampler.generate([[5], []], SamplingParams(max_tokens=4))
    with pytest.raises(UserError, match="prompt 0 has 300 tokens"):
        sampler.generate([[5] * 300], SamplingParams(max_tokens=4))
    with pytest.raises(UserError, match="outside"):
        sampler.generate([[VOCAB]], SamplingParams(max_tokens=4))


# ---- sharding --------------------------------------------------------------------------------


def test_mesh_2x2x2_matches_one_device(model_dir, sampler):
    from cpe_jax.sharding import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = Sampler(sampler_model(model_dir, mesh), sampler.tokenizer, mesh=mesh)
    prompts = _prompts([3, 10, 6], seed=2)
    for params in (SamplingParams(max_tokens=8, temperature=0),
                   SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=4)):
        want = sampler.generate(prompts, params)
        got = sharded.generate(prompts, params)
        for w, g in zip(want, got):
            assert g.token_ids == w.token_ids
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
            np.testing.assert_allclose(g.sampling_logprobs, w.sampling_logprobs, atol=1e-4)


# ---- CLI -------------------------------------------------------------------------------------


def test_generate_cli_writes_one_row_per_sample(model_dir, tmp_path, sampler):
    rows = [
        {"prompt": "hello world", "id": "a"},
        {"prompt_token_ids": [5, 6, 7]},
        {"messages": [{"role": "user", "content": "the quick fox"}]},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cli.main(["generate", "--model", str(model_dir), "--prompts", str(src), "--out", str(dst),
              "--max-tokens", "5", "--temperature", "0", "--n", "2", "--batch-size", "4"])
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert not (tmp_path / "out.jsonl.tmp").exists()
    assert [(o.get("id"), o["index"]) for o in out] == [("a", 0), ("a", 1), (None, 0), (None, 1),
                                                         (None, 0), (None, 1)]
    tok = sampler.tokenizer
    chat = tok.apply_chat_template(rows[2]["messages"], tokenize=False, add_generation_prompt=True)
    expected = sampler.generate(
        [tok.encode("hello world"), [5, 6, 7], tok.encode(chat, add_special_tokens=False)],
        SamplingParams(max_tokens=5, temperature=0),
    )
    for o, e in zip(out[::2], expected):
        assert o["token_ids"] == e.token_ids and o["text"] == e.text
        assert o["finish_reason"] == e.finish_reason and len(o["logprobs"]) == len(e.token_ids)


@pytest.mark.parametrize(
    "bad_row, message",
    [('{"prompt": 3}', "prompt"), ("not json", "bad JSON"),
     ('{"prompt_token_ids": [1, "x"]}', "prompt_token_ids"), ('{"text": "hi"}', "exactly one"),
     ('{"messages": [{"role": "user"}]}', "messages")],
)
def test_generate_cli_rejects_malformed_row_before_generating(model_dir, tmp_path, capsys,
                                                              bad_row, message):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "hello"}\n' + bad_row + "\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--model", str(model_dir), "--prompts", str(src), "--out", str(dst)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{src}:2:" in err and message in err
    assert not dst.exists() and not (tmp_path / "out.jsonl.tmp").exists()
