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

With an output directory, `grm_pair_scores` is resumable: every judgement is appended to
OUT/rm_eval_judgements.jsonl as it comes, so a rerun judges only what is missing. A judge call
that gets no answer is stored nowhere; after `max_consecutive_failures` in a row it stops
(JudgeUnavailable, exit code 3) and rm_eval.json is not written until every pair is judged. A
response the server refuses (HTTP 400/413/422) goes to OUT/errors.jsonl; its pair is left out of
the accuracy and counted as `row_errors`.
"""

import hashlib
import json
import logging
import math
import os

import numpy as np

from cpe_jax.data.personafeedback import CATEGORIES, TIERS, known_first
from cpe_jax.data.prompts import DIMENSIONS
from cpe_jax.errors import JudgeUnavailable, UserError
from cpe_jax.data.jsonl import JsonlAppender, read_finished_rows, write_jsonl_atomic
from cpe_jax.reward.judges import DEFAULT_MAX_CONSECUTIVE_FAILURES, NO_ANSWER, ROW_ERROR, FailureStreak, RowErrorLog

log = logging.getLogger(__name__)

JUDGEMENTS_FILE = "rm_eval_judgements.jsonl"
ERRORS_FILE = "errors.jsonl"
SIDES = ("chosen", "rejected")


def _examples(pairs, side):
    return [{"persona": p.persona, "question": p.question, "response": getattr(p, side)} for p in pairs]


def _judgement_key(index, pair, side, repeat, settings=""):
    """Pair index, side, repeat and a hash of the text judged and the judge `settings`: a rerun on
    other data or with another judge never matches."""
    text = f"{settings}\0{pair.question}\0{getattr(pair, side)}"
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    return f"{index}:{side}:{repeat}:{digest}"


def read_judgements(path, keys):
    """{key: row} of a judgements file; a torn last line is dropped, a foreign key refused."""
    rows = {}
    for line_no, row in read_finished_rows(path, lambda row: isinstance(row, dict) and "key" in row,
                                           "not a judgement written by `cpe-jax rm-eval` (fix or move the file)"):
        if row["key"] not in keys:
            raise UserError(f"{path}:{line_no}: judgement {row['key']!r} belongs to other data or settings; "
                            "use another --out")
        rows[row["key"]] = row
    return rows


def grm_pair_scores(scorer, pairs, *, repeat=1, batch_size=32, out_dir=None, skip_row_errors=True,
                    max_consecutive_failures=DEFAULT_MAX_CONSECUTIVE_FAILURES, settings=""):
    """Scores of chosen and rejected responses: {side: {dimension|"reward": float [K, N]}} (NaN = invalid),
    plus `"refused"`: bool [N], pairs with a response the judge refused (their scores are NaN).

    With `out_dir`, judgements are cached there and a rerun judges only the missing ones (see the
    module docstring); raises JudgeUnavailable while any response is unjudged. `settings` (judge,
    temperature, ...) is part of every cached judgement's key.
    """
    tasks = [(_judgement_key(i, pair, side, r, settings), i, side, r)
             for side in SIDES for r in range(repeat) for i, pair in enumerate(pairs)]
    cache_path = os.path.join(out_dir, JUDGEMENTS_FILE) if out_dir else None
    done = read_judgements(cache_path, {t[0] for t in tasks}) if cache_path else {}
    errors = RowErrorLog(os.path.join(out_dir, ERRORS_FILE), skip=skip_row_errors) if out_dir else None
    refused = set(errors.rows) if errors else set()
    streak = FailureStreak(max_consecutive_failures)
    todo = [t for t in tasks if t[0] not in done and t[0] not in refused]
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    cache = JsonlAppender(cache_path) if cache_path else None
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            result = scorer.score([{"persona": pairs[i].persona, "question": pairs[i].question,
                                    "response": getattr(pairs[i], side)} for _, i, side, _ in chunk])
            for j, (key, i, side, r) in enumerate(chunk):
                outcome = result.outcomes[j]
                if outcome == NO_ANSWER:
                    continue  # stored nowhere: a rerun judges it
                if outcome == ROW_ERROR:
                    where = f"{pairs[i].source} ({side})"
                    if errors is None:
                        raise UserError(f"{where}: the judge refused this response ({result.problems[j]})")
                    line = str(pairs[i].source).rsplit(":", 1)[-1]
                    errors.add(key, pairs[i].source, int(line) if line.isdigit() else i + 1,
                               result.problems[j].removeprefix("row error: "), where)
                    refused.add(key)
                    continue
                row = {"key": key, "pair": i, "side": side, "repeat": r,
                       "scores": {name: _number(result.scores[name][j]) for name in DIMENSIONS + ("reward",)},
                       "valid": bool(result.valid[j]), "problem": result.problems[j]}
                done[key] = row
                if cache:
                    cache.write(row)
            if streak.update(result.outcomes, result.problems):
                break  # the judge is down: stop at once
    finally:
        if cache:
            cache.close()
    missing = [t for t in tasks if t[0] not in done and t[0] not in refused]
    if missing:
        open_pairs = {i for _, i, _, _ in missing}
        reason = streak.reason() if streak.tripped else f"{len(missing)} judge calls got no answer"
        raise JudgeUnavailable(reason, done=len(pairs) - len(open_pairs), remaining=len(open_pairs), unit="pairs")
    if cache_path and list(done) != [t[0] for t in tasks if t[0] in done]:  # same file as an unbroken run
        write_jsonl_atomic(cache_path, [done[t[0]] for t in tasks if t[0] in done])
    if errors:
        errors.finish([t[0] for t in tasks])
    out = {side: {name: np.full((repeat, len(pairs)), np.nan) for name in DIMENSIONS + ("reward",)} for side in SIDES}
    for key, i, side, r in tasks:
        if key in done:
            for name, value in done[key]["scores"].items():
                out[side][name][r, i] = np.nan if value is None else value
    out["refused"] = np.zeros(len(pairs), bool)
    for key, i, _, _ in tasks:
        if key in refused:
            out["refused"][i] = True
    return out


def bt_pair_scores(model, tokenizer, pairs, *, batch_size=8, max_length=2048, language="en",
                   spread_over_hosts=False):
    """Scores of a Bradley-Terry RM in the same layout as `grm_pair_scores` (K = 1, reward only).
    `spread_over_hosts`: in a multi-host job with the model on each host's own devices, each host
    scores its share of the responses (`sharding.spread_over_hosts`)."""
    from cpe_jax import sharding
    from cpe_jax.reward.bt import BTScorer

    scorer = BTScorer(model, tokenizer, batch_size=batch_size, max_length=max_length, language=language)

    def work(examples):
        return [float(x) for x in scorer.score_array(examples)]

    def scores(examples):
        return sharding.spread_over_hosts(work, examples) if spread_over_hosts else work(examples)

    return {side: {"reward": np.asarray(scores(_examples(pairs, side)), np.float64)[None]} for side in SIDES}


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
    refused = scores.get("refused")
    if refused is not None and refused.any():  # pairs the judge refused are no judgement: left out
        keep = np.flatnonzero(~refused)
        pairs = [pairs[i] for i in keep]
        scores = {side: {name: values[:, keep] for name, values in scores[side].items()} for side in SIDES}
    chosen, rejected = scores["chosen"]["reward"][0], scores["rejected"]["reward"][0]
    metrics = dict(info or {})
    metrics["judged"] = len(pairs)
    metrics["unjudged"] = 0
    metrics["row_errors"] = int(refused.sum()) if refused is not None else 0
    metrics["notes"] = list(notes)
    if metrics["row_errors"]:
        metrics["notes"].append(f"{metrics['row_errors']} pairs left out: the judge refused a response "
                                f"(listed in {ERRORS_FILE}).")
    metrics["accuracy"] = accuracy_table(pairs, chosen, rejected)
    metrics["stability"] = stability(scores)
    from cpe_jax.sharding import write_atomically  # process 0 only in a multi-host job

    os.makedirs(out_dir, exist_ok=True)
    write_atomically(os.path.join(out_dir, "rm_eval.json"), json.dumps(_without_nan(metrics), indent=2,
                                                                       ensure_ascii=False))
    write_atomically(os.path.join(out_dir, "rm_eval.md"), markdown(metrics))
    outcome, _ = pair_outcomes(chosen, rejected)
    pair_rows = []
    for i, pair in enumerate(pairs):
        row = {"source": pair.source, "category": pair.category, "tier": pair.tier, "outcome": float(outcome[i])}
        for side in ("chosen", "rejected"):
            row[side] = {name: _number(values[0][i]) for name, values in scores[side].items()}
        pair_rows.append(row)
    write_jsonl_atomic(os.path.join(out_dir, "rm_eval_pairs.jsonl"), pair_rows)
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


# ---- `cpe-jax rm-eval` --------------------------------------------------------------------------


def main(argv, *, mesh=None):
    """`cpe-jax rm-eval`: parse the flags, score every pair, write OUT/rm_eval.json and rm_eval.md."""
    import argparse

    from cpe_jax.data.prompts import GRM_STYLES
    from cpe_jax.reward.judge_factory import add_judge_arguments, add_row_error_argument

    p = argparse.ArgumentParser(
        prog="cpe-jax rm-eval",
        description="Pairwise accuracy of a reward model on PersonaFeedback (chosen scored above "
        "rejected), per tier and specific/general; ties and unreadable GRM judgements count half. "
        "Writes OUT/rm_eval.json, OUT/rm_eval.md and OUT/rm_eval_pairs.jsonl. With --repeat K, "
        "each response is judged K times and judge stability is reported.",
    )
    p.add_argument("--data", required=True, metavar="ROOT", help="PersonaFeedback directory (either layout)")
    p.add_argument("--rm", metavar="PATH", help="reward model directory (--rm-type bt, or a flax GRM)")
    p.add_argument("--rm-type", required=True, choices=["grm", "bt"])
    add_judge_arguments(p, required=False)
    add_row_error_argument(p)
    p.add_argument("--grm-mode", choices=["text", "expected"], default="text",
                   help="flax GRM: parse written scores (text) or expected scores over -5..5")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--repeat", type=int, default=1, help="judge every response K times (stability)")
    p.add_argument("--temperature", type=float, default=None,
                   help="GRM temperature (default 0, or 0.9 - the critique temperature - with --repeat > 1)")
    p.add_argument("--max-tokens", type=int, default=1024, help="GRM reply length")
    p.add_argument("--language", choices=["en", "zh"], default="en")
    p.add_argument("--prompt-style", choices=GRM_STYLES, default="full",
                   help="GRM prompt: the paper's rubric (full) or a one-paragraph one (compact); the one the GRM was "
                   "distilled on")
    p.add_argument("--categories", metavar="LIST",
                   help="comma-separated, of general, specific (default: every category that has files; "
                   "one named here must have them)")
    p.add_argument("--tiers", metavar="LIST", help="comma-separated, of easy, medium (or mid), hard (default: "
                   "all three, each of which must have a non-empty file in a category that has files)")
    p.add_argument("--allow-missing", action="store_true",
                   help="go on without missing or empty tier files and categories, warning with the table")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    from cpe_jax.data.personafeedback import find_pair_files, read_pairs
    from cpe_jax.errors import require_path
    from cpe_jax.sharding import is_host_local

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.repeat < 1 or args.batch_size < 1:
        raise UserError(f"--repeat={args.repeat} and --batch-size={args.batch_size} must be >= 1")
    def names(value):  # "easy, mid" -> ["easy", "mid"]; None stays None (the default)
        return None if value is None else [n.strip() for n in value.split(",") if n.strip()]

    found = find_pair_files(args.data, categories=names(args.categories), tiers=names(args.tiers),
                            allow_missing=args.allow_missing)
    pairs = read_pairs(found)
    temperature = args.temperature if args.temperature is not None else (0.9 if args.repeat > 1 else 0.0)
    info = {"rm_type": args.rm_type, "data": os.path.abspath(args.data), "repeat": args.repeat}
    if args.rm_type == "bt":
        if args.judge or args.repeat > 1 or not args.rm:
            raise UserError("--rm-type bt needs --rm and takes no --judge or --repeat")
        from cpe_jax.reward.bt import BTRewardModel
        from cpe_jax.tokenizer import load_tokenizer

        path = require_path(args.rm, "reward model directory")
        scores = bt_pair_scores(BTRewardModel.load(path, mesh=mesh), load_tokenizer(path), pairs,
                                batch_size=args.batch_size, language=args.language,
                                spread_over_hosts=is_host_local(mesh))
        info["rm"] = os.path.abspath(path)
    else:
        kind = args.judge or "flax"
        if kind != "flax" and args.rm:
            raise UserError(f"--rm is the flax GRM's directory; it cannot be used with --judge {kind}")
        if kind != "flax" and args.grm_mode == "expected":
            raise UserError("--grm-mode expected needs a flax GRM (--rm)")
        if kind == "flax" and not (args.rm or args.judge_path):
            raise UserError("--rm-type grm needs --rm (a flax GRM directory) or --judge python/http")
        if kind == "flax" and args.grm_mode == "expected":
            import cpe_jax
            from cpe_jax.reward.flax_grm import FlaxGRMScorer
            from cpe_jax.reward.grm import AcrossHostsScorer
            from cpe_jax.tokenizer import load_tokenizer

            path = require_path(args.rm or args.judge_path, "GRM directory")
            scorer = FlaxGRMScorer(cpe_jax.load_model(path, mesh=mesh), load_tokenizer(path), mesh=mesh,
                                   language=args.language, temperature=temperature, max_tokens=args.max_tokens,
                                   prompt_style=args.prompt_style)
            if is_host_local(mesh):  # every host holds every pair: each scores its share
                scorer = AcrossHostsScorer(scorer)
            info["rm"] = f"flax-expected:{os.path.abspath(path)}"
        else:
            from cpe_jax.reward.grm import GRMScorer
            from cpe_jax.reward.judge_factory import judge_from_arguments

            args.judge = kind
            judge, info["rm"] = judge_from_arguments(args, judge_path=args.rm, mesh=mesh)
            scorer = GRMScorer(judge, language=args.language, temperature=temperature, max_tokens=args.max_tokens,
                               prompt_style=args.prompt_style)
        info["temperature"] = temperature
        scores = grm_pair_scores(scorer, pairs, repeat=args.repeat, batch_size=args.batch_size,
                                         out_dir=args.out, skip_row_errors=args.skip_row_errors,
                                         max_consecutive_failures=args.max_consecutive_failures,
                                         settings=json.dumps([kind, args.judge_model or args.judge_fn or info["rm"],
                                                              args.grm_mode, temperature, args.max_tokens,
                                                              args.language, args.prompt_style]))
    metrics = evaluate(pairs, scores, args.out, info=info, notes=found.notes)
    overall = metrics["accuracy"]["overall"]
    for note in found.notes:
        print(note)
    print(f"n={overall['n']} accuracy {100 * overall['accuracy']:.1f}% (ties {overall['ties']}, "
          f"invalid {overall['invalid']}); table in {os.path.join(args.out, 'rm_eval.md')}")
    return 0
