"""Which edited responses train the policy, and how they join the batch.

After the GRM has scored both the original responses and their critique-driven edits, a strategy
keeps a fraction `ratio` of the edits (paper: random at r = 0.5 is best, 64.1 LC win rate, against
57.0 for reward_rank and 53.7 for conditional). The kept edits are re-attached to the ORIGINAL
prompt, so the policy learns to write them without seeing the critique.

Everything here is a pure, shape-static jax function: `strategy` is a static Python string, the
counts depend on the data and are applied as masks, never as shapes.

Counts are round-half-up: round(0.5 * 3) = 2, so a ratio of 0.5 never drops to zero edits for an
odd group of rollouts. Ties in the ranking strategies are broken at random with `key`, so no
rollout position is favoured and the result is still reproducible for a fixed key.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cpe_jax.errors import UserError

STRATEGIES = ("none", "random", "reward_rank", "conditional", "batch_rank")


def check_edit_settings(strategy, ratio):
    """Raise a UserError naming the field when `strategy` or `ratio` is not usable."""
    if strategy not in STRATEGIES:
        raise UserError(f"edit_strategy must be one of {STRATEGIES}, got {strategy!r}")
    if isinstance(ratio, jax.core.Tracer):
        return  # a traced ratio is checked where it was made
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise UserError(f"edit_ratio must be a number in [0, 1], got {ratio!r}") from None
    if not 0.0 <= ratio <= 1.0:  # also rejects NaN
        raise UserError(f"edit_ratio must be in [0, 1], got {ratio}")


def _round_count(ratio, n):
    """round(ratio * n), halves rounded up; float32-safe for the small integers used here."""
    return jnp.floor(ratio * n + 0.5 + 1e-6).astype(jnp.int32)


def _rank_within_groups(scores, groups, tiebreak):
    """0-based rank of each row among the rows of its group, highest score first.

    scores: float [B] (-inf for rows that must come last); groups: int [B]; tiebreak: float [B]
    random, orders rows with equal scores. Returns (rank int [B], group size int [B]).
    """
    # lexsort sorts by the last key first: group, then score descending, then the tiebreak.
    order = jnp.lexsort((tiebreak, -scores, groups))
    sorted_groups = groups[order]
    first = jnp.searchsorted(sorted_groups, sorted_groups, side="left")
    after_last = jnp.searchsorted(sorted_groups, sorted_groups, side="right")
    positions = jnp.arange(scores.shape[0])
    rank = jnp.zeros_like(positions).at[order].set(positions - first)
    size = jnp.zeros_like(positions).at[order].set(after_last - first)
    return rank, size


def select_edits(strategy, *, rewards_orig, rewards_edit, question_ids, ratio, key,
                 valid_orig=None, valid_edit=None):
    """Choose which of the B edited responses join the training batch.

    - "none": no edits (plain PPO).
    - "random": keep round(ratio * number of valid edits) valid edits, uniformly over the batch.
    - "reward_rank": per question (rows sharing `question_ids`), keep the top round(ratio * group
      size) edits by edited reward.
    - "conditional": per question, rank edits by their improvement over their own original
      (rewards_edit - rewards_orig) and keep the top round(ratio * group size) of those that
      strictly improved; an edit that did not improve is never kept.
    - "batch_rank": keep the top round(ratio * B) edits by edited reward over the whole batch.
    An invalid edit (valid_edit False, or a NaN reward; for "conditional" also an invalid
    original) is never kept, so fewer edits than the count may survive.

    rewards_orig, rewards_edit: float [B]; question_ids: int [B]; ratio: float in [0, 1];
    key: a jax.random key; valid_orig, valid_edit: optional bool [B]. Returns bool [B].
    """
    check_edit_settings(strategy, ratio)
    rewards_orig = jnp.asarray(rewards_orig, jnp.float32)
    rewards_edit = jnp.asarray(rewards_edit, jnp.float32)
    question_ids = jnp.asarray(question_ids)
    batch = rewards_edit.shape[0]
    usable = ~jnp.isnan(rewards_edit)
    if valid_edit is not None:
        usable &= jnp.asarray(valid_edit).astype(bool)
    if strategy == "none":
        return jnp.zeros((batch,), bool)

    tiebreak = jax.random.uniform(key, (batch,))
    single_group = jnp.zeros((batch,), jnp.int32)
    if strategy == "random":
        rank, _ = _rank_within_groups(jnp.where(usable, 0.0, -jnp.inf), single_group, tiebreak)
        return usable & (rank < _round_count(ratio, jnp.sum(usable)))
    if strategy == "batch_rank":
        rank, _ = _rank_within_groups(jnp.where(usable, rewards_edit, -jnp.inf), single_group,
                                      tiebreak)
        return usable & (rank < _round_count(ratio, batch))
    if strategy == "reward_rank":
        score = rewards_edit
    else:  # conditional
        usable &= ~jnp.isnan(rewards_orig)
        if valid_orig is not None:
            usable &= jnp.asarray(valid_orig).astype(bool)
        score = rewards_edit - rewards_orig
        usable &= score > 0
    rank, size = _rank_within_groups(jnp.where(usable, score, -jnp.inf), question_ids, tiebreak)
    return usable & (rank < _round_count(ratio, size))


class TrainingRows(NamedTuple):
    """The 2B training rows: originals first (rows 0..B-1), then their edits (rows B..2B-1).

    tokens: int [2B, P+R] prompt then response; attention_mask: [2B, P+R] (0 on padding and on
    every token of an unselected edit); response_mask: [2B, R] tokens that get a loss; is_edit:
    bool [2B]; source_row: int [2B], the original row each row came from (for question ids, pi_e,
    rewards); keep: bool [2B], the rows that take part (all originals, the selected edits).
    """

    tokens: jax.Array
    attention_mask: jax.Array
    response_mask: jax.Array
    is_edit: jax.Array
    source_row: jax.Array
    keep: jax.Array


def _pad_time(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def build_training_rows(prompt_tokens, prompt_mask, orig_tokens, orig_mask, edit_tokens,
                        edit_mask, keep_edit, orig_keep=None):
    """Stack originals and edits into 2B rows, each edit after the ORIGINAL prompt.

    Shapes are static whatever is selected: an unselected edit is still a row, but fully masked,
    so every loss ignores it (see `ppo.aggregate`) and the step never recompiles.
    prompt_tokens, prompt_mask: [B, P] (left-padded, as the sampler produces them);
    orig_tokens, orig_mask: [B, R]; edit_tokens, edit_mask: [B, R_edit] (right-padded; the shorter
    of R and R_edit is padded up to the longer); keep_edit: bool [B] from `select_edits`;
    orig_keep: optional bool [B] to drop originals too (e.g. padding rows of a bucketed batch).
    Returns TrainingRows with R = max(R, R_edit).
    """
    batch = prompt_tokens.shape[0]
    length = max(orig_tokens.shape[1], edit_tokens.shape[1])
    responses = jnp.concatenate([_pad_time(orig_tokens, length), _pad_time(edit_tokens, length)])
    response_mask = jnp.concatenate([_pad_time(orig_mask, length), _pad_time(edit_mask, length)])
    orig_keep = jnp.ones((batch,), bool) if orig_keep is None else jnp.asarray(orig_keep, bool)
    keep = jnp.concatenate([orig_keep, jnp.asarray(keep_edit, bool)])
    prompts = jnp.concatenate([prompt_tokens, prompt_tokens])
    prompt_mask = jnp.concatenate([prompt_mask, prompt_mask])

    tokens = jnp.concatenate([prompts, responses.astype(prompts.dtype)], axis=1)
    attention_mask = jnp.concatenate([prompt_mask, response_mask.astype(prompt_mask.dtype)], axis=1)
    attention_mask = jnp.where(keep[:, None], attention_mask, 0)
    response_mask = jnp.where(keep[:, None], response_mask, 0)
    is_edit = jnp.arange(2 * batch) >= batch
    source_row = jnp.tile(jnp.arange(batch), 2)
    return TrainingRows(tokens, attention_mask, response_mask, is_edit, source_row, keep)
