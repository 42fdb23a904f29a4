"""Evaluation: pairwise judging against a baseline, raw and length-controlled win rates, reports."""

from cpe_jax.eval.report import summarize, write_report
from cpe_jax.eval.winrate import PairwiseJudgement, judge_pairs, lc_win_rate, raw_win_rate

__all__ = ["PairwiseJudgement", "judge_pairs", "lc_win_rate", "raw_win_rate", "summarize", "write_report"]
