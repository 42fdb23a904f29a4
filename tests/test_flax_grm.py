import jax
import numpy as np
import pytest
import torch
import transformers

import cpe_jax
from cpe_jax.data.prompts import DIMENSIONS
from cpe_jax.data.padding import left_pad
from cpe_jax.reward.flax_grm import (
    SCORES_OPENING,
    FlaxGRMJudge,
    FlaxGRMScorer,
    build_score_tables,
    critique_prefix,
    expected_scores,
)
from cpe_jax.reward.grm import GRMScorer, combine_scores
from cpe_jax.sampling import Sampler, SamplingParams
from cpe_jax.tokenizer import apply_chat_template, load_tokenizer
from test_tokenizer import write_tiny_tokenizer

LABELS = ["Helpfulness:", "\nPersonalization:", "\nNatural:"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_grm")
    cfg = transformers.Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        initializer_range=0.1, eos_token_id=2, bos_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).eval().save_pretrained(path)
    write_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return cpe_jax.load_model(model_dir)


def _torch_logprobs(hf, ids):
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def _reference(hf, tokenizer, prefix):
    """Plain loop: score every candidate on prefix + forced text + candidate, one sequence at a time."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    candidates = [encode(f" {v}") for v in range(-5, 6)]
    seq, probs = list(prefix), []
    for label in LABELS:
        seq += encode(label)
        totals = []
        for cand in candidates:
            lp = _torch_logprobs(hf, seq + cand)
            totals.append(sum(lp[len(seq) - 1 + j, tok] for j, tok in enumerate(cand)))
        totals = np.array(totals)
        p = np.exp(totals - totals.max())
        probs.append(p / p.sum())
        seq += candidates[int(np.argmax(totals))]
    return np.array(probs)


def test_expected_scores_equal_softmax_over_candidate_tokens(model_dir, model, tokenizer):
    from flax import nnx

    tables = build_score_tables(tokenizer)
    assert tables.candidate_mask.sum(axis=1).max() > 1  # multi-token candidates are exercised
    hf = transformers.Qwen2ForCausalLM.from_pretrained(model_dir).eval()
    rng = np.random.RandomState(0)
    prefixes = [list(rng.randint(3, 300, size=n)) + tokenizer.encode(SCORES_OPENING) for n in (4, 11)]
    tokens, mask, _ = left_pad(prefixes, max(map(len, prefixes)) + 3, pad_id=0)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, tokens, mask, tables: expected_scores(graphdef, state, tokens, mask, tables))
    out = jax.device_get(run(state, tokens, mask, tables))
    assert out["probs"].shape == (2, 3, 11)
    values = np.arange(-5, 6)
    for i, prefix in enumerate(prefixes):
        ref = _reference(hf, tokenizer, prefix)
        np.testing.assert_allclose(out["probs"][i], ref, atol=2e-5)
        for d, dim in enumerate(DIMENSIONS):
            np.testing.assert_allclose(out[dim][i], ref[d] @ values, atol=2e-4)
            assert out["argmax"][i, d] == values[np.argmax(ref[d])]


def test_judge_replies_in_order_with_first_token_logprobs(model, tokenizer):
    judge = FlaxGRMJudge(model, tokenizer, max_tokens=6)
    chats = [[{"role": "user", "content": text}] for text in ("hello world", "the lazy dog", "user likes")]
    replies = judge(chats, temperature=0.0, max_tokens=100, want_logprobs=True)
    sampler = Sampler(model, tokenizer)
    for chat, reply in zip(chats, replies):
        prompt = apply_chat_template(tokenizer, chat)
        alone = sampler.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0))[0]
        assert reply.text == alone.text
        top_token, top_logprob = max(reply.first_token_logprobs.items(), key=lambda kv: kv[1])
        assert top_token == tokenizer.decode([alone.token_ids[0]])
        assert top_logprob == pytest.approx(alone.logprobs[0], abs=1e-4)
    assert judge([], temperature=0.0) == []


def test_grm_scorer_over_flax_judge_and_expected_mode(model, tokenizer):
    examples = [
        {"persona": "likes dogs", "question": "hello?", "response": "hello world"},
        {"persona": "a fox", "question": "quick?", "response": "The quick brown fox."},
    ]
    scorer = FlaxGRMScorer(model, tokenizer, max_tokens=4)
    result = scorer.score(examples)
    assert result.valid.all() and result.problems == ["", ""]
    for dim in DIMENSIONS:
        assert np.all(np.abs(result.scores[dim]) <= 5)
    np.testing.assert_allclose(result.scores["reward"], combine_scores(result.scores))

    parsed = GRMScorer(scorer.judge).score(examples)  # the same judge, read as text
    assert len(parsed) == 2  # a random model writes no scores block: both rows invalid, never 0
    assert not parsed.valid.any() and np.isnan(parsed.scores["reward"]).all()


def test_critique_prefix_cuts_at_the_first_closing_tag():
    text, critique = critique_prefix("<critique>\nGood start.\n</critique>\n<scores>\nHelpfulness: 9")
    assert text == "<critique>\nGood start.\n" + SCORES_OPENING and critique == "Good start."
    text, critique = critique_prefix("no tags, cut off")
    assert text == "<critique>\nno tags, cut off\n" + SCORES_OPENING and critique == "no tags, cut off"


def test_expected_scores_of_scanned_stack_equal_unrolled(model_dir, tokenizer):
    """The candidate pass repeats each layer's prompt cache per candidate: for a stacked [L, B, ...]
    cache that must repeat rows, not layers, so both layouts score alike on the same weights."""
    from flax import nnx

    tables = build_score_tables(tokenizer)
    rng = np.random.RandomState(1)
    prefixes = [list(rng.randint(3, 300, size=n)) + tokenizer.encode(SCORES_OPENING) for n in (3, 9)]
    tokens, mask, _ = left_pad(prefixes, max(map(len, prefixes)) + 2, pad_id=0)
    outs = []
    for scan in (False, True):
        model = cpe_jax.load_model(model_dir, dtype="float32", scan_layers=scan)
        assert model.config.scan_layers is scan
        graphdef, state = nnx.split(model)
        outs.append(jax.device_get(jax.jit(
            lambda state, tokens, mask, tables: expected_scores(graphdef, state, tokens, mask, tables)
        )(state, tokens, mask, tables)))
    unrolled, scanned = outs
    np.testing.assert_allclose(scanned["probs"], unrolled["probs"], atol=1e-5)
    np.testing.assert_array_equal(scanned["argmax"], unrolled["argmax"])
    for dim in DIMENSIONS:
        np.testing.assert_allclose(scanned[dim], unrolled[dim], atol=1e-4)
