"""The fused CPE step: token-level prompt assembly, one compile, in-graph expected scores, training."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import make_persona_world_policy
from tests.test_trainer import smoke_config

PIECE_WIDTHS = dict(prompt_length=96, grm_prefix_length=640, edit_prefix_length=192)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    import shutil

    from tests.helpers import make_hf_qwen2

    policy = tmp_path_factory.mktemp("fused_policy")
    tokenizer = make_persona_world_policy(policy, seed=0)
    grm = tmp_path_factory.mktemp("fused_grm")
    shutil.copytree(policy, grm, dirs_exist_ok=True)  # same tokenizer, other (peakier) weights
    make_hf_qwen2(grm, seed=1, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, layers=2,
                  heads=4, kv_heads=2, init_scale=0.2)
    return str(policy), str(grm)


def fused_config(policy_dir, grm_dir, **overrides):
    config = smoke_config(policy_dir, total_steps=3, save_every=100)
    config.grm.type = "flax"
    config.grm.fused = True
    config.grm.path = grm_dir
    config.grm.max_tokens = 12
    config.grm.max_prompt_length = PIECE_WIDTHS["grm_prefix_length"]
    config.rollout.max_response_length = 10
    config.edit.max_prompt_length = 256
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def test_concat_pieces_equals_concatenated_token_lists():
    from cpe_jax.rl.fused import concat_pieces, keep_last

    rng = np.random.RandomState(0)
    rows = [[list(rng.randint(1, 50, size=n)) for n in lengths] for lengths in ((3, 0, 2), (1, 4, 0), (0, 0, 5))]
    widths, lefts = (4, 5, 6), (True, False, True)
    pieces = []
    for k, (width, left) in enumerate(zip(widths, lefts)):
        tokens = np.zeros((len(rows), width), np.int32)
        mask = np.zeros((len(rows), width), bool)
        for i, row in enumerate(rows):
            seq = row[k]
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            tokens[i, cols], mask[i, cols] = seq, True
        pieces.append((tokens, mask))
    tokens, mask = jax.jit(concat_pieces)(pieces)
    total = sum(widths)
    for i, row in enumerate(rows):
        expected = [t for seq in row for t in seq]
        assert np.asarray(mask[i]).sum() == len(expected)
        assert list(np.asarray(tokens[i, total - len(expected):])) == expected
        assert not np.asarray(mask[i, : total - len(expected)]).any()
    short, short_mask, truncated = keep_last(tokens, mask, 4)
    assert list(np.asarray(truncated)) == [True, True, True]
    assert list(np.asarray(short[0])) == [t for seq in rows[0] for t in seq][-4:]


def test_cut_at_stops_before_the_close_tag_and_drops_eos():
    from cpe_jax.rl.fused import cut_at

    tokens = jnp.asarray([[5, 7, 8, 9, 7, 8, 2, 0], [5, 6, 2, 0, 0, 0, 0, 0], [7, 7, 7, 7, 7, 7, 7, 8]])
    mask = jnp.asarray([[1] * 7 + [0], [1] * 3 + [0] * 5, [1] * 8], bool)
    keep = np.asarray(cut_at(tokens, mask, (7, 8), (2,)))
    assert keep.sum(axis=1).tolist() == [1, 2, 6]


def test_pieces_tokenize_like_the_host_prompts(model_dirs):
    """Joining the pieces with the tokens of a response gives the host's prompt (responses chosen so
    that no BPE merge crosses a piece boundary)."""
    from cpe_jax.data import prompts as templates
    from cpe_jax.rl.fused import CRITIQUE_OPENING, PieceEncoder, concat_pieces
    from cpe_jax.rl.trainer import PromptStream
    from cpe_jax.tokenizer import apply_chat_template, load_tokenizer

    tokenizer = load_tokenizer(model_dirs[0])
    encoder = PieceEncoder(tokenizer, tokenizer, language="en", pad_id=0, vocab_size=len(tokenizer),
                           grm_vocab_size=len(tokenizer), **PIECE_WIDTHS)
    stream = PromptStream(smoke_config(model_dirs[0]).data)
    examples = stream.take(0, 2)
    # No final punctuation: "." + "\n" would merge into one token across the piece boundary.
    responses = ["Try a short walk after lunch", "Read one chapter, then sleep"]
    critique = "Mention the user's schedule"
    pieces, truncated = encoder.encode(examples, [0, 1])
    assert truncated == {"prompt": 0, "grm_prefix": 0, "edit_prefix": 0}
    response_ids = [tokenizer.encode(r, add_special_tokens=False) for r in responses]
    critique_ids = tokenizer.encode(critique, add_special_tokens=False)

    def padded(seqs, width):
        tokens = np.zeros((len(seqs), width), np.int32)
        mask = np.zeros((len(seqs), width), bool)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)], mask[i, : len(s)] = s, True
        return tokens, mask

    grm, grm_mask = concat_pieces([(pieces["grm_prefix_tokens"], pieces["grm_prefix_mask"]), padded(response_ids, 16),
                                   (pieces["grm_suffix_tokens"], pieces["grm_suffix_mask"])])
    edit, edit_mask = concat_pieces([(pieces["edit_prefix_tokens"], pieces["edit_prefix_mask"]), padded(response_ids, 16),
                                     (pieces["edit_middle_tokens"], pieces["edit_middle_mask"]),
                                     padded([critique_ids] * 2, 16),
                                     (pieces["edit_suffix_tokens"], pieces["edit_suffix_mask"])])
    for i, (ex, response) in enumerate(zip(examples, responses)):
        host_grm = apply_chat_template(tokenizer, templates.grm_messages(ex["persona"], ex["question"], response))
        host_grm += tokenizer.encode(CRITIQUE_OPENING, add_special_tokens=False)
        assert np.asarray(grm[i][np.asarray(grm_mask[i])]).tolist() == host_grm
        host_edit = apply_chat_template(tokenizer, templates.post_edit_messages(
            ex["messages"][-1]["content"], response, critique))
        assert np.asarray(edit[i][np.asarray(edit_mask[i])]).tolist() == host_edit
        prompt = apply_chat_template(tokenizer, ex["messages"])
        assert np.asarray(pieces["prompt_tokens"][i][pieces["prompt_mask"][i]]).tolist() == prompt


@pytest.fixture(scope="module")
def trainer(model_dirs, tmp_path_factory):
    from cpe_jax.rl.trainer import Trainer

    return Trainer(fused_config(*model_dirs), str(tmp_path_factory.mktemp("fused_run")))


def _examples(trainer):
    p = trainer.config.ppo
    prompts = trainer.data.take(0, p.prompts_per_step)
    examples = [x for x in prompts for _ in range(p.rollouts_per_prompt)]
    row_ids = [x["question_id"] * p.rollouts_per_prompt + j for x in prompts for j in range(p.rollouts_per_prompt)]
    return examples, row_ids


def test_rewards_are_expected_scores_of_the_assembled_prefixes(trainer):
    """The in-graph rewards of a fused step equal `expected_scores` called separately on prefixes
    rebuilt in NumPy from the pieces, the sampled response (without EOS) and the critique (cut at
    </critique>)."""
    from cpe_jax.reward.flax_grm import expected_scores
    from cpe_jax.reward.grm import combine_scores
    from cpe_jax.data.padding import left_pad

    fused = trainer.fused
    examples, row_ids = _examples(trainer)
    step, metrics = trainer.train_one_step()
    assert step == 1
    batch = extras = jax.device_get(fused.last_samples)
    pieces, _ = fused.encoder.encode(examples, row_ids)
    policy_eos = set(fused.settings.policy_sample.end_token_ids)
    grm_eos = set(fused.settings.critique_sample.end_token_ids)
    close = list(fused.settings.critique_close)
    opening = np.asarray(fused.tables.score_opening).tolist()
    prefixes = []
    for i in range(len(examples)):
        response = [t for t, m in zip(batch["orig_tokens"][i], batch["orig_mask"][i]) if m and t not in policy_eos]
        critique = []
        for t in extras["critique"][i].tolist():
            if t in grm_eos:
                break
            critique.append(t)
            if critique[-len(close):] == close:
                critique = critique[: -len(close)]
                break
        prefix = (pieces["grm_prefix_tokens"][i][pieces["grm_prefix_mask"][i]].tolist() + response
                  + pieces["grm_suffix_tokens"][i][pieces["grm_suffix_mask"][i]].tolist() + critique + opening)
        prefixes.append(prefix)
        assert extras["orig_prefix"][i][extras["orig_prefix_mask"][i]].tolist() == prefix
    width = extras["orig_prefix"].shape[1]
    tokens, mask, _ = left_pad(prefixes, width, 0)
    score = jax.jit(lambda t, m: combine_scores(expected_scores(fused.grm_graphdef, fused.grm_state, t, m,
                                                                fused.tables.score)))
    rewards = np.asarray(score(tokens, mask))
    np.testing.assert_allclose(batch["orig_rewards"], rewards, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(extras["edit_rewards"], score(extras["edit_prefix"], extras["edit_prefix_mask"]),
                               rtol=1e-4, atol=1e-4)
    assert np.ptp(batch["orig_rewards"]) > 0  # the rows really differ
    assert batch["keep_edit"].sum() == 4  # random edits, r = 0.5 of 8 rollouts
    assert metrics["orig/reward"] == pytest.approx(float(np.mean(rewards)), abs=1e-4)


def test_trainer_runs_fused_steps_with_one_compile_and_writes_metrics(trainer):
    first = trainer.step  # 1 after the test above
    before = jax.tree.map(np.asarray, (trainer.state.policy, trainer.state.critic))
    trainer.run(progress=False)
    after = jax.tree.map(np.asarray, (trainer.state.policy, trainer.state.critic))
    assert trainer.step == 3
    assert trainer.fused.compile_count == 1  # every step reuses the first compile
    changed = [not np.array_equal(a, b) for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)) if b.ndim >= 2]
    assert all(changed)
    rows = [json.loads(line) for line in open(os.path.join(trainer.workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(first + 1, 4))
    for key in ("orig/reward", "orig/helpfulness", "orig/personalization", "orig/naturalness", "edit/reward",
                "orig/length", "edit/length", "edit/selected", "grm/failure_rate", "actor/pg_loss",
                "critic/value_loss", "actor/lr", "perf/tokens_per_s", "data/position"):
        assert key in rows[-1], key
    assert rows[-1]["edit/selected"] == 4
    assert rows[-1]["grm/failure_rate"] == 0.0


def test_fused_step_lowers_to_one_program_without_host_callbacks(trainer):
    fused = trainer.fused
    examples, row_ids = _examples(trainer)
    with jax.set_mesh(trainer.mesh):
        pieces, _ = fused.pieces(examples, row_ids)
        text = fused._step.lower(trainer.state, fused.grm_state, fused.tables, pieces, jax.random.key(0)).as_text()
    assert "callback" not in text.lower()
    assert text.count("stablehlo.while") >= 4  # the four samplers' decode loops are inside
