"""The slot engine equals the static sampler row for row, whatever slot a row ran in, when it
started or what ran beside it; refilled slots carry no trace of their last row; steady state does
not compile."""

import jax
import numpy as np
import pytest
from flax import nnx

from cpe_jax.engine import Engine
from cpe_jax.models.qwen2.model import Qwen2Config, Qwen2ForCausalLM
from cpe_jax.sampling import SampleConfig, SamplingParams, row_keys, sample
from cpe_jax.sharding import make_mesh

EOS = 2
VOCAB = 128


@pytest.fixture(scope="module")
def model():
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=EOS,
                         initializer_range=0.3)
    return Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, VOCAB, size=n)] for n in lengths]


MIXED = [  # max_tokens, temperature, top_p, top_k, seed, n, ignore_eos, stop_token_ids
    (12, 0.0, 1.0, 0, 0, 1, False, ()),
    (7, 0.9, 0.9, 0, 1, 2, True, ()),
    (20, 1.0, 1.0, 5, 2, 1, False, (17,)),
    (3, 0.7, 0.5, 3, 3, 3, True, ()),
    (16, 0.0, 1.0, 0, 0, 1, True, ()),
    (9, 1.2, 1.0, 0, 5, 2, False, (40, 41)),
    (5, 0.9, 0.8, 10, 6, 1, True, ()),
    (1, 0.8, 1.0, 0, 7, 2, False, ()),
]


def _params():
    return [SamplingParams(max_tokens=m, temperature=t, top_p=p, top_k=k, seed=s, n=n, ignore_eos=ie,
                           stop_token_ids=stop) for m, t, p, k, s, n, ie, stop in MIXED]


def _static_rows(model, prompts, params_list):
    """Each prompt alone through the static `sample()` core with its own settings as constants."""
    graphdef, state = nnx.split(model)
    rows = []
    for i, (prompt, p) in enumerate(zip(prompts, params_list)):
        config = SampleConfig(max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                              eos_token_ids=(EOS,), stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos)
        tokens = np.asarray([prompt] * p.n, np.int32)
        out = jax.device_get(sample(graphdef, state, tokens, np.ones_like(tokens, bool),
                                    row_keys(p.seed, [i * p.n + j for j in range(p.n)]), config))
        for j in range(p.n):
            n = int(out.lengths[j])
            rows.append((out.tokens[j, :n].tolist(), out.logprobs[j, :n], out.sampling_logprobs[j, :n],
                         bool(out.stopped[j])))
    return rows


def _assert_rows_equal(got, want):
    assert len(got) == len(want)
    for row, (tokens, logprobs, sampling_logprobs, stopped) in zip(got, want):
        assert row.token_ids == tokens
        # To 1e-5, relative for log-probs below -1: this model's logits are large (initializer
        # 0.3), and batches of other shapes round them differently by a few float32 ulps.
        np.testing.assert_allclose(row.logprobs, logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(row.sampling_logprobs, sampling_logprobs, rtol=1e-5, atol=1e-5)
        assert row.stopped == stopped


@pytest.mark.parametrize("slots, mesh_shape", [(4, None), (16, None), (8, (2, 2, 2))])
def test_rows_equal_the_static_sampler(model, slots, mesh_shape):
    """Ragged prompts, mixed per-request settings and n > 1, with slots refilled many times (4),
    all at once (16) and sharded over a (data, fsdp, tensor) = (2, 2, 2) mesh."""
    prompts = _prompts([3, 9, 17, 5, 30, 2, 11, 6])
    params = _params()
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape))) if mesh_shape else None
    engine = Engine(model, num_slots=slots, mesh=mesh, eos_token_ids=(EOS,), sync_every=3)
    rows = engine.generate(prompts, params)
    assert [(r.prompt_index, r.index) for r in rows] == [(i, j) for i, p in enumerate(params) for j in range(p.n)]
    _assert_rows_equal(rows, _static_rows(model, prompts, params))


def test_a_refilled_slot_sees_no_trace_of_its_last_row(model):
    """One slot: request B after a long request A equals B after another request of A's shape,
    bitwise (the previous row's keys and values leave no trace), and B run alone (same tokens,
    log-probs to float rounding: the cache then has another length)."""
    first, other, second = _prompts([25, 25, 4], seed=3)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=12, temperature=0.9, seed=4, ignore_eos=True)
    engine = Engine(model, num_slots=1, eos_token_ids=(EOS,), sync_every=5)
    after = engine.generate([first, second], [long, short])[1]
    after_other = engine.generate([other, second], [long, short])[1]
    assert after.token_ids == after_other.token_ids
    assert after.logprobs == after_other.logprobs and after.sampling_logprobs == after_other.sampling_logprobs
    alone = engine.generate([first[:1], second], [SamplingParams(max_tokens=40, ignore_eos=True), short])[1]
    assert after.token_ids == alone.token_ids
    np.testing.assert_allclose(after.logprobs, alone.logprobs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(after.sampling_logprobs, alone.sampling_logprobs, rtol=0, atol=1e-5)


def test_a_refilled_slot_sees_nothing_a_broken_last_row_left(model):
    """A row whose keys and values went non-finite (here: a NaN embedding row for a token of its
    prompt) leaves NaN in its slot's cache; the next request in that slot equals the same request
    after a clean row, bitwise, and is finite (0 x NaN is NaN: no slot the new row does not see may
    reach it through its zero probability)."""
    graphdef, state = nnx.split(model)
    broken_id = 1  # never in `_prompts` (ids from 3)

    def break_embedding(path, x):
        return x.at[broken_id].set(np.nan) if jax.tree_util.keystr(path).startswith("['embed']") else x

    broken = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(break_embedding, state))
    clean, second = _prompts([25, 4], seed=5)
    first = clean[:10] + [broken_id] + clean[11:]
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=12, temperature=0.9, seed=4, ignore_eos=True)
    engine = Engine(broken, num_slots=1, eos_token_ids=(EOS,), sync_every=5)
    spoiled, after = engine.generate([first, second], [long, short])
    _, after_clean = engine.generate([clean, second], [long, short])
    assert np.isnan(spoiled.logprobs).all()
    assert np.isfinite(after.logprobs).all() and broken_id not in after.token_ids
    assert after.token_ids == after_clean.token_ids
    assert after.logprobs == after_clean.logprobs and after.sampling_logprobs == after_clean.sampling_logprobs


def test_n_samples_share_one_prefill(model, caplog):
    import logging

    engine = Engine(model, num_slots=8, eos_token_ids=(EOS,))
    with caplog.at_level(logging.INFO, logger="cpe_jax.engine"):
        rows = engine.generate(_prompts([7, 9]), [SamplingParams(max_tokens=4, temperature=1.0, n=4)] * 2)
    assert "compiling engine admission: 2 prompts x 16 tokens into 8 rows" in caplog.text
    assert len({tuple(r.token_ids) for r in rows}) > 1


def test_steady_state_does_not_compile_again(model):
    engine = Engine(model, num_slots=4, eos_token_ids=(EOS,), sync_every=4)
    # ignore_eos: rows end at their max_tokens, so slots free up (and requests arrive) in the same groups.
    params = [SamplingParams(max_tokens=m, temperature=0.8, seed=i, ignore_eos=True)
              for i, m in enumerate([5, 9, 3, 12, 7, 6])]
    engine.generate(_prompts([3, 10, 6, 14, 2, 9], seed=1), params)
    compiles = engine.compile_count
    # New prompts of new lengths within the same buckets (<= 16 tokens), arriving in the same groups.
    engine.generate(_prompts([5, 12, 1, 16, 8, 4], seed=2), params)
    assert engine.compile_count == compiles


def test_bad_requests_are_user_errors(model):
    from cpe_jax.errors import UserError

    engine = Engine(model, num_slots=2, eos_token_ids=(EOS,))
    with pytest.raises(UserError, match="n=3 is more than the engine's 2 slots"):
        engine.generate(_prompts([3]), [SamplingParams(n=3)])
    with pytest.raises(UserError, match="2 prompts but 1 SamplingParams"):
        engine.generate(_prompts([3, 4]), [SamplingParams()])
    with pytest.raises(UserError, match="sync_every"):
        Engine(model, sync_every=0)
