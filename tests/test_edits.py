"""Edit selection strategies and training-row assembly on hand-made batches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpe_jax.errors import UserError
from cpe_jax.rl import edits

KEY = jax.random.key(0)
NAN = float("nan")


def select(strategy, rewards_orig, rewards_edit, question_ids, ratio, key=KEY, **kw):
    return np.asarray(edits.select_edits(
        strategy, rewards_orig=jnp.asarray(rewards_orig, jnp.float32),
        rewards_edit=jnp.asarray(rewards_edit, jnp.float32),
        question_ids=jnp.asarray(question_ids), ratio=ratio, key=key, **kw))


def chosen(mask):
    return set(np.flatnonzero(mask).tolist())


# Two questions (ids 7 and 3, interleaved on purpose), four rollouts each.
QUESTIONS = [7, 3, 7, 3, 7, 3, 7, 3]
ORIG = [0.0, 1.0, 2.0, 3.0, 4.0, -1.0, 1.0, 0.0]
EDIT = [1.0, 0.5, 5.0, 4.5, 3.0, 2.0, 1.5, 0.1]


def test_none_keeps_nothing():
    assert not select("none", ORIG, EDIT, QUESTIONS, 1.0).any()


@pytest.mark.parametrize("ratio,expected", [(0.5, 4), (0.25, 2), (0.0, 0), (1.0, 8),
                                            (0.3, 2)])
def test_random_keeps_ratio_of_valid_edits(ratio, expected):
    mask = select("random", ORIG, EDIT, QUESTIONS, ratio)
    assert mask.sum() == expected


def test_random_rounds_half_up_and_skips_invalid_edits():
    edit = [1.0, NAN, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    valid = np.array([True, True, True, False, True, True, True, True])
    for seed in range(20):
        mask = select("random", ORIG, edit, QUESTIONS, 0.5, jax.random.key(seed), valid_edit=valid)
        assert mask.sum() == 3  # round(0.5 * 6 valid edits) = 3
        assert not mask[1] and not mask[3]
    # 5 valid edits at r = 0.5: 2.5 rounds up to 3.
    assert select("random", ORIG, edit, QUESTIONS, 0.5, valid_edit=valid & (np.arange(8) != 0)
                  ).sum() == 3


def test_random_is_deterministic_per_key_and_roughly_uniform():
    fn = jax.jit(jax.vmap(lambda key: edits.select_edits(
        "random", rewards_orig=jnp.asarray(ORIG), rewards_edit=jnp.asarray(EDIT),
        question_ids=jnp.asarray(QUESTIONS), ratio=0.5, key=key)))
    keys = jax.random.split(jax.random.key(1), 2000)
    masks = np.asarray(fn(keys))
    np.testing.assert_array_equal(masks, np.asarray(fn(keys)))
    np.testing.assert_array_equal(masks[0], select("random", ORIG, EDIT, QUESTIONS, 0.5, keys[0]))
    # Each edit is kept about half the time, whatever its reward or position.
    np.testing.assert_allclose(masks.mean(axis=0), 0.5, atol=0.05)
    assert len({row.tobytes() for row in masks}) > 10


def test_reward_rank_keeps_top_edits_per_question():
    mask = select("reward_rank", ORIG, EDIT, QUESTIONS, 0.5)
    # Question 7 rows 0, 2, 4, 6 edited rewards 1, 5, 3, 1.5 -> rows 2, 4.
    # Question 3 rows 1, 3, 5, 7 edited rewards 0.5, 4.5, 2, 0.1 -> rows 3, 5.
    assert chosen(mask) == {2, 3, 4, 5}
    assert chosen(select("reward_rank", ORIG, EDIT, QUESTIONS, 0.25)) == {2, 3}
    assert select("reward_rank", ORIG, EDIT, QUESTIONS, 1.0).all()


def test_reward_rank_counts_per_group_size_and_never_keeps_invalid():
    # Question 0 has 3 rollouts (round(0.5 * 3) = 2), question 1 has 1 (round(0.5) = 1).
    questions = [0, 0, 0, 1]
    mask = select("reward_rank", [0] * 4, [1.0, 3.0, 2.0, -4.0], questions, 0.5)
    assert chosen(mask) == {1, 2, 3}
    # The best edit is invalid: it is not kept and no other edit takes its place beyond the count.
    mask = select("reward_rank", [0] * 4, [1.0, 3.0, NAN, -4.0], questions, 0.5,
                  valid_edit=np.array([True, False, True, True]))
    assert chosen(mask) == {0, 3}


def test_reward_rank_ties_are_broken_at_random():
    picks = {int(np.flatnonzero(select("reward_rank", [0] * 4, [2.0, 2.0, 2.0, 0.0], [0] * 4,
                                         0.25, jax.random.key(seed)))[0]) for seed in range(30)}
    assert picks == {0, 1, 2}


def test_conditional_ranks_by_improvement_and_requires_an_improvement():
    mask = select("conditional", ORIG, EDIT, QUESTIONS, 0.5)
    # Improvements q7: rows 0 +1, 2 +3, 4 -1, 6 +0.5 -> rows 2, 0.
    # Improvements q3: rows 1 -0.5, 3 +1.5, 5 +3, 7 +0.1 -> rows 5, 3.
    assert chosen(mask) == {0, 2, 3, 5}
    # Ratio 1: every improved edit, none of the others.
    assert chosen(select("conditional", ORIG, EDIT, QUESTIONS, 1.0)) == {0, 2, 3, 5, 6, 7}
    # No improvement at all (equal rewards do not count): nothing kept.
    assert not select("conditional", [1.0, 2.0], [1.0, 0.0], [0, 0], 1.0).any()


def test_conditional_skips_invalid_originals():
    mask = select("conditional", [NAN, 0.0, 0.0, 0.0], [9.0, 1.0, 2.0, 3.0], [0] * 4, 0.5,
                  valid_orig=np.array([True, True, True, False]))
    assert chosen(mask) == {1, 2}


def test_batch_rank_ranks_over_the_whole_batch():
    mask = select("batch_rank", ORIG, EDIT, QUESTIONS, 0.5)
    assert chosen(mask) == {2, 3, 4, 5}  # edited rewards 5, 4.5, 3, 2
    mask = select("batch_rank", ORIG, EDIT, QUESTIONS, 0.25)
    assert chosen(mask) == {2, 3}  # both from different questions: no per-question quota
    edit = list(EDIT)
    edit[2] = NAN
    assert chosen(select("batch_rank", ORIG, edit, QUESTIONS, 0.25)) == {3, 4}


@pytest.mark.parametrize("strategy", edits.STRATEGIES)
def test_invalid_edits_are_never_selected(strategy):
    valid = np.array([True, False] * 4)
    edit = np.array(EDIT) + 100.0
    edit[2] = NAN
    for seed in range(5):
        mask = select(strategy, ORIG, edit, QUESTIONS, 1.0, jax.random.key(seed),
                      valid_edit=valid)
        assert not mask[~valid].any() and not mask[2]


@pytest.mark.parametrize("strategy", edits.STRATEGIES)
def test_strategies_jit_with_a_traced_ratio(strategy):
    fn = jax.jit(functools.partial(edits.select_edits, strategy))
    got = fn(rewards_orig=jnp.asarray(ORIG), rewards_edit=jnp.asarray(EDIT),
             question_ids=jnp.asarray(QUESTIONS), ratio=0.5, key=KEY)
    np.testing.assert_array_equal(got, select(strategy, ORIG, EDIT, QUESTIONS, 0.5))


@pytest.mark.parametrize("ratio", [-0.1, 1.5, NAN, "half"])
def test_bad_ratio_is_a_user_error(ratio):
    with pytest.raises(UserError, match="edit_ratio"):
        select("random", ORIG, EDIT, QUESTIONS, ratio)


def test_unknown_strategy_is_a_user_error():
    with pytest.raises(UserError, match="edit_strategy"):
        select("best", ORIG, EDIT, QUESTIONS, 0.5)
    with pytest.raises(UserError, match="edit_strategy"):
        edits.check_edit_settings("Random", 0.5)
    edits.check_edit_settings("random", 0.5)


def test_build_training_rows_reattaches_edits_to_the_original_prompt():
    prompt = np.array([[0, 11, 12], [21, 22, 23]])  # row 0 left-padded
    prompt_mask = np.array([[0, 1, 1], [1, 1, 1]])
    orig = np.array([[31, 32], [41, 0]])
    orig_mask = np.array([[1, 1], [1, 0]])
    edit = np.array([[51, 52, 53], [61, 62, 0]])  # edits are longer: originals get padded
    edit_mask = np.array([[1, 1, 1], [1, 1, 0]])
    keep = np.array([False, True])

    rows = jax.jit(edits.build_training_rows)(prompt, prompt_mask, orig, orig_mask, edit,
                                              edit_mask, keep)
    np.testing.assert_array_equal(rows.tokens, [[0, 11, 12, 31, 32, 0], [21, 22, 23, 41, 0, 0],
                                                [0, 11, 12, 51, 52, 53], [21, 22, 23, 61, 62, 0]])
    np.testing.assert_array_equal(rows.attention_mask, [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0],
                                                        [0] * 6, [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(rows.response_mask, [[1, 1, 0], [1, 0, 0], [0, 0, 0],
                                                       [1, 1, 0]])
    np.testing.assert_array_equal(rows.is_edit, [False, False, True, True])
    np.testing.assert_array_equal(rows.source_row, [0, 1, 0, 1])
    np.testing.assert_array_equal(rows.keep, [True, True, False, True])


def test_build_training_rows_can_drop_padding_originals():
    ones = np.ones((2, 2), np.int32)
    rows = edits.build_training_rows(ones, ones, ones, ones, ones, ones,
                                     keep_edit=np.array([True, False]),
                                     orig_keep=np.array([True, False]))
    np.testing.assert_array_equal(rows.keep, [True, False, True, False])
    np.testing.assert_array_equal(rows.response_mask.sum(axis=1), [2, 0, 2, 0])
