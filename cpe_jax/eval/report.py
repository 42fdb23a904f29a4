"""Win-rate tables and plots: metrics overall, per PersonaFeedback tier and specific/general.

`summarize` turns per-example annotation rows into metrics; `write_report` writes them as
`metrics.json`, a markdown table (`report.md`) and two PNG plots. Plots use matplotlib's
`Figure` directly, so no global backend is switched and no display is needed.
"""

import json
import os

import numpy as np

from cpe_jax.data.personafeedback import known_first
from cpe_jax.errors import UserError
from cpe_jax.eval.winrate import MIN_ROWS_FOR_LC, lc_win_rate, raw_win_rate

_REQUIRED = ("preference", "model_length", "baseline_length")
# Known tier names first, in difficulty order (the release says "mid", the HF layout "medium").
_TIER_ORDER = ("easy", "mid", "medium", "hard")
_CATEGORY_ORDER = ("specific", "general")

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
WIN_RATE_PLOT = "win_rate_by_tier.png"
LENGTH_PLOT = "length_distribution.png"


def _columns(rows):
    for i, row in enumerate(rows):
        missing = [k for k in _REQUIRED if row.get(k) is None]
        if missing:
            raise UserError(f"annotation row {i} lacks {', '.join(missing)}")
    return [np.array([row[k] for row in rows], dtype=float) for k in _REQUIRED]


def _group_metrics(rows):
    """LC metrics where the GLM can be fit; otherwise the raw rate with LC fields set to None."""
    columns = _columns(rows)
    if len(rows) >= MIN_ROWS_FOR_LC:  # every row is its own CV group, so this also covers the folds
        return lc_win_rate(*columns)
    metrics = raw_win_rate(*columns)
    metrics.update(lc_win_rate=None, lc_standard_error=None)
    return metrics


def _by(rows, field, known_order):
    keys = {str(row[field]) for row in rows if row.get(field) is not None}
    return {
        key: _group_metrics([row for row in rows if str(row.get(field)) == key])
        for key in known_first(keys, known_order)
    }


_GROUPINGS = (("tier", _TIER_ORDER), ("category", _CATEGORY_ORDER))


def summarize(rows):
    """Metrics overall and per `tier` and `category` from rows with preference and lengths.

    Returns `{"overall": {...}, "by_tier": {tier: {...}}, "by_category": {category: {...}}}`;
    each entry is `lc_win_rate`'s dict (rates in percent). Groups too small for the
    length-controlled GLM get the raw rate and `lc_win_rate: None`. When no row has a tier (or
    category) label, `by_tier` is None and `by_tier_reason` says why; when only some rows lack
    one, `by_tier_unlabelled` counts them (they are in no tier's row).
    """
    rows = list(rows)
    if not rows:
        raise UserError("no annotation rows to summarize")
    out = {"overall": _group_metrics(rows)}
    for field, order in _GROUPINGS:
        unlabelled = sum(1 for row in rows if row.get(field) is None)
        if unlabelled == len(rows):
            out[f"by_{field}"] = None
            out[f"by_{field}_reason"] = (
                f"the evaluation set has no {field} labels: give its rows a `{field}` field, or pass "
                f"`cpe-jax eval --labels FILE` with rows {{persona, question, tier, category}}"
            )
            continue
        out[f"by_{field}"] = _by(rows, field, order)
        if unlabelled:
            out[f"by_{field}_unlabelled"] = unlabelled
    return out


# ----------------------------------------------------------------------------------------------
# Writing


def _rate(value, error):
    if value is None:
        return "–"
    return f"{value:.1f} ± {error:.1f}" if error is not None else f"{value:.1f}"


def _table(metrics):
    lines = [
        "| Group | n | Win rate (%) | LC win rate (%) | Mean length, model | Mean length, baseline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    sections = [("overall", {"all": metrics["overall"]})] if "overall" in metrics else []
    sections += [(name, metrics.get(f"by_{name}") or {}) for name in ("tier", "category")]
    for section, groups in sections:
        for key, m in groups.items():
            label = "Overall" if section == "overall" else f"{section}: {key}"
            lines.append(
                f"| {label} | {m['n']} | {_rate(m['win_rate'], m.get('standard_error'))} "
                f"| {_rate(m.get('lc_win_rate'), m.get('lc_standard_error'))} "
                f"| {m['mean_model_length']:.0f} | {m['mean_baseline_length']:.0f} |"
            )
    return "\n".join(lines)


def grouping_notes(metrics):
    """Sentences on what the per-tier and per-category rows leave out (none when they cover all)."""
    notes = []
    for field, _ in _GROUPINGS:
        if metrics.get(f"by_{field}_reason"):
            notes.append(f"No per-{field} rows: {metrics[f'by_{field}_reason']}.")
        elif metrics.get(f"by_{field}_unlabelled"):
            notes.append(f"{metrics[f'by_{field}_unlabelled']} of {metrics['overall']['n']} rows have no "
                         f"{field} label and are in no {field} row.")
    return notes


def _markdown(metrics):
    grouping = {f"by_{f}{suffix}" for f, _ in _GROUPINGS for suffix in ("", "_reason", "_unlabelled")}
    run = {k: v for k, v in metrics.items() if not isinstance(v, dict) and k not in grouping}
    parts = [
        "# Win rate against the baseline",
        "Rates in percent ± standard error. LC: AlpacaEval's length-controlled win rate "
        "(GLM on tanh of the standardized length difference, predicted at equal length); "
        f"\"–\" where a group has fewer than {MIN_ROWS_FOR_LC} rows. Lengths in characters.",
        _table(metrics),
        *grouping_notes(metrics),
    ]
    if run:
        parts.append("## Run\n\n" + "\n".join(f"- {k}: {v}" for k, v in run.items()))
    return "\n\n".join(parts) + "\n"


def _plot_win_rates(metrics, path):
    from matplotlib.figure import Figure

    groups = {"overall": metrics["overall"], **(metrics.get("by_tier") or {})}
    labels = list(groups)
    x = np.arange(len(labels))
    fig = Figure(figsize=(1.6 * len(labels) + 2, 4))
    ax = fig.subplots()
    for offset, key, err, name in ((-0.2, "win_rate", "standard_error", "raw"),
                                   (0.2, "lc_win_rate", "lc_standard_error", "length-controlled")):
        values = [groups[g].get(key) for g in labels]
        errors = [groups[g].get(err) or 0.0 for g in labels]
        heights = [np.nan if v is None else v for v in values]
        ax.bar(x + offset, heights, width=0.4, yerr=errors, capsize=3, label=name)
        for xi, v in zip(x, values):
            if v is None:  # too few rows for the GLM
                ax.text(xi + offset, 2, "n/a", ha="center", va="bottom", fontsize=8)
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 100)
    ax.set_ylabel("win rate vs baseline (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_lengths(rows, path):
    from matplotlib.figure import Figure

    _, model_len, base_len = _columns(rows)
    bins = np.histogram_bin_edges(np.concatenate([model_len, base_len]), bins=30)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.hist(base_len, bins=bins, alpha=0.6, label=f"baseline (mean {base_len.mean():.0f})")
    ax.hist(model_len, bins=bins, alpha=0.6, label=f"model (mean {model_len.mean():.0f})")
    ax.set_xlabel("response length (characters)")
    ax.set_ylabel("responses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(out_dir, metrics, rows):
    """Write metrics.json, report.md and the two plots into `out_dir` (process 0 only in a
    multi-host job); return their paths.

    `metrics` is `summarize(rows)`, optionally with extra top-level entries (judge name, number
    of unparseable replies, ...) that go to the JSON file and the report's "Run" list.
    """
    from cpe_jax.sharding import is_primary, write_atomically

    if "overall" not in metrics:
        raise UserError("metrics lack an 'overall' entry; pass the output of summarize(rows)")
    paths = {name: os.path.join(out_dir, name) for name in (METRICS_FILE, REPORT_FILE, WIN_RATE_PLOT, LENGTH_PLOT)}
    if not is_primary():  # in a multi-host job process 0 writes the report
        return paths
    os.makedirs(out_dir, exist_ok=True)
    write_atomically(paths[METRICS_FILE], json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    write_atomically(paths[REPORT_FILE], _markdown(metrics))
    _plot_win_rates(metrics, paths[WIN_RATE_PLOT])
    _plot_lengths(list(rows), paths[LENGTH_PLOT])
    return paths
