"""Reward-model accuracy on PersonaFeedback: does the RM score `chosen` above `rejected`?

A pair counts 1 when chosen scores higher, 0 when lower and 1/2 on a tie. A GRM judgement that
cannot be read (NaN reward on either side) also counts 1/2: the RM gave no preference, which is
what a tie means, and counting it as wrong or dropping it would make a judge that fails on hard
pairs look worse or better than it is. Invalid pairs are reported separately (`invalid`).
Results are given overall, per specific/general category, per tier and per category x tier.

With `repeat` K > 1 (judge stability), every response is judged K times; accuracy is that of the
first repeat (comparable with K = 1) and `stability` reports, per dimension, the mean variance of
a response's score across repeats, the fraction of responses whose repeats all agree, and the
fraction of pairs whose verdict (better / tie / worse) is the same in every repeat.
"""

import json
import math
import os

import numpy as np

from cpe_jax.data.personafeedback import CATEGORIES, TIERS, known_first
from cpe_jax.data.prompts import DIMENSIONS


def _examples(pairs, side):
    return [{"persona": p.persona, "question": p.question, "response": getattr(p, side)} for p in pairs]


def grm_pair_scores(scorer, pairs, *, repeat=1, batch_size=32):
    """Scores of chosen and rejected responses: {side: {dimension|"reward": float [K, N]}} (NaN = invalid)."""
    out = {}
    for side in ("chosen", "rejected"):
        examples = _examples(pairs, side)
        per_repeat = []
        for _ in range(repeat):
            chunks = [scorer.score(examples[s : s + batch_size]) for s in range(0, len(examples), batch_size)]
            per_repeat.append({
                name: np.concatenate([c.scores[name] for c in chunks]) if chunks else np.zeros(0)
                for name in DIMENSIONS + ("reward",)
            })
        out[side] = {name: np.stack([r[name] for r in per_repeat]) for name in DIMENSIONS + ("reward",)}
    return out


def bt_pair_scores(model, tokenizer, pairs, *, batch_size=8, max_length=2048, language="en"):
    """Scores of a Bradley-Terry RM in the same layout as `grm_pair_scores` (K = 1, reward only)."""
    from cpe_jax.reward.bt import score_texts

    return {
        side: {"reward": np.asarray(score_texts(model, tokenizer, _examples(pairs, side), batch_size=batch_size,
                                                max_length=max_length, language=language), np.float64)[None]}
        for side in ("chosen", "rejected")
    }


def pair_outcomes(chosen, rejected):
    """1 / 0.5 / 0 per pair (NaN on either side counts 0.5) and the invalid mask."""
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    invalid = np.isnan(chosen) | np.isnan(rejected)
    outcome = np.where(chosen > rejected, 1.0, np.where(chosen < rejected, 0.0, 0.5))
    return np.where(invalid, 0.5, outcome), invalid


def _summary(outcome, invalid, chosen, rejected):
    ties = (~invalid) & (np.asarray(chosen) == np.asarray(rejected))
    n = len(outcome)
    return {
        "n": n,
        "accuracy": float(np.mean(outcome)) if n else math.nan,
        "ties": int(ties.sum()),
        "invalid": int(invalid.sum()),
    }


def accuracy_table(pairs, chosen, rejected):
    """{"overall": ..., "general": ..., "easy": ..., "general/easy": ...} of n, accuracy, ties,
    invalid: per category and tier the pairs carry (PersonaFeedback's first, then any others, e.g.
    PersonaWorld's one-flaw aspects) and per category/tier combination."""
    outcome, invalid = pair_outcomes(chosen, rejected)
    categories = np.array([str(p.category) for p in pairs])
    tiers = np.array([str(p.tier) for p in pairs])
    category_names, tier_names = known_first(categories, CATEGORIES), known_first(tiers, TIERS)
    groups = {"overall": np.ones(len(pairs), bool)}
    for category in category_names:
        groups[category] = categories == category
    for tier in tier_names:
        groups[tier] = tiers == tier
    for category in category_names:
        for tier in tier_names:
            groups[f"{category}/{tier}"] = (categories == category) & (tiers == tier)
    return {
        name: _summary(outcome[m], invalid[m], np.asarray(chosen)[m], np.asarray(rejected)[m])
        for name, m in groups.items()
        if m.any() or name == "overall"
    }


def stability(scores):
    """Judge stability across K repeats (see the module docstring); {} when K == 1."""
    k = scores["chosen"]["reward"].shape[0]
    if k < 2:
        return {}
    out = {"repeats": k, "dimensions": {}}
    for name in scores["chosen"]:
        values = np.concatenate([scores["chosen"][name], scores["rejected"][name]], axis=1)  # [K, 2N]
        complete = ~np.isnan(values).any(axis=0)  # responses judged validly in every repeat
        v = values[:, complete]
        out["dimensions"][name] = {
            "mean_variance": float(np.mean(np.var(v, axis=0))) if v.size else math.nan,
            "agreement": float(np.mean(np.all(v == v[:1], axis=0))) if v.size else math.nan,
            "responses": int(complete.sum()),
        }
    verdicts = np.sign(scores["chosen"]["reward"] - scores["rejected"]["reward"])  # NaN if invalid
    complete = ~np.isnan(verdicts).any(axis=0)
    v = verdicts[:, complete]
    out["pair_verdict_agreement"] = float(np.mean(np.all(v == v[:1], axis=0))) if v.size else math.nan
    out["accuracy_per_repeat"] = [
        float(np.mean(pair_outcomes(scores["chosen"]["reward"][i], scores["rejected"]["reward"][i])[0]))
        for i in range(k)
    ]
    out["invalid_per_repeat"] = [
        int((np.isnan(scores["chosen"]["reward"][i]) | np.isnan(scores["rejected"]["reward"][i])).sum())
        for i in range(k)
    ]
    return out


def evaluate(pairs, scores, out_dir, *, info=None, notes=()):
    """Write OUT/rm_eval.json, OUT/rm_eval.md and OUT/rm_eval_pairs.jsonl; return the metrics.

    `notes` (e.g. `PairFiles.notes`: categories or tier files the data lacks) go into the JSON as
    `notes` and into the markdown above the table.
    """
    chosen, rejected = scores["chosen"]["reward"][0], scores["rejected"]["reward"][0]
    metrics = dict(info or {})
    metrics["notes"] = list(notes)
    metrics["accuracy"] = accuracy_table(pairs, chosen, rejected)
    metrics["stability"] = stability(scores)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "rm_eval.json"), "w", encoding="utf-8") as f:
        json.dump(_without_nan(metrics), f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "rm_eval.md"), "w", encoding="utf-8") as f:
        f.write(markdown(metrics))
    outcome, _ = pair_outcomes(chosen, rejected)
    with open(os.path.join(out_dir, "rm_eval_pairs.jsonl"), "w", encoding="utf-8") as f:
        for i, pair in enumerate(pairs):
            row = {"source": pair.source, "category": pair.category, "tier": pair.tier, "outcome": float(outcome[i])}
            for side in ("chosen", "rejected"):
                row[side] = {name: _number(values[0][i]) for name, values in scores[side].items()}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return metrics


def _without_nan(value):
    """NaN -> null, so the JSON is standard."""
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _number(x):
    return None if math.isnan(x) else float(x)


def markdown(metrics):
    """The accuracy table (and the stability table when there are repeats) as markdown."""
    lines = [f"# Reward-model accuracy: {metrics.get('rm', '')}", ""]
    if metrics.get("notes"):  # what the data lacks, above the table it shapes
        lines += [*metrics["notes"], ""]
    lines += ["| group | n | accuracy | ties | invalid |", "|---|---:|---:|---:|---:|"]
    for name, row in metrics["accuracy"].items():
        lines.append(f"| {name} | {row['n']} | {100 * row['accuracy']:.1f}% | {row['ties']} | {row['invalid']} |")
    lines += ["", "Ties and invalid judgements count as half a correct pair."]
    stab = metrics.get("stability") or {}
    if stab:
        lines += ["", f"## Judge stability over {stab['repeats']} repeats", "",
                  "| score | mean variance | all repeats agree | responses |", "|---|---:|---:|---:|"]
        for name, row in stab["dimensions"].items():
            lines.append(f"| {name} | {row['mean_variance']:.3f} | {100 * row['agreement']:.1f}% | {row['responses']} |")
        lines += ["", f"Pair verdict agreement across repeats: {100 * stab['pair_verdict_agreement']:.1f}%; "
                  f"accuracy per repeat: {', '.join(f'{100 * a:.1f}%' for a in stab['accuracy_per_repeat'])}."]
    return "\n".join(lines) + "\n"
