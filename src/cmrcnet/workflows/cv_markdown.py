"""summary.md of a cross-validation: methods side by side, then per-fold means."""

from __future__ import annotations

from typing import Any

from cmrcnet.workflows.cv_plan import SECTION_NOTE
from cmrcnet.workflows.cv_summary import N_A_NOTE, PER_FOLD_METRICS, SUMMARY_METRICS


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(stats: dict[str, Any], n_expected: int, digits: int = 3) -> str:
    """Mean ± sd as text, with "(n=k)" when only k of the n_expected runs had a value."""
    if stats["mean"] is None:
        return "n/a"
    text = _fmt(stats["mean"], digits) + ("" if stats["std"] is None else f" ± {_fmt(stats['std'], digits)}")
    return text + (f" (n={stats['n']})" if stats["n"] < n_expected else "")


def summary_markdown(s: dict[str, Any]) -> str:
    """summary.md: methods side by side, then per-fold means; protocol, split, notes, command, wall time.

    Parameters
    ----------
    s
        The summary dict (`cmrcnet.workflows.cv_summary.summarize_cv`).

    Returns
    -------
    str
        The Markdown text.
    """
    lines = _header(s) + _methods_table(s) + _folds_table(s) + _footer(s)
    return "\n".join(lines) + "\n"


def _header(s: dict[str, Any]) -> list[str]:
    title = f"# cmrcnet cross-validation ({s['protocol']})" + (" - SYNTHETIC data" if s["synthetic"] else "")
    lines = [title, ""]
    if s["synthetic"]:
        lines += [f"**{s['synthetic_note']}**", ""]
    if s["protocol_id"] == "paper":
        lines += [f"**{s['protocol_note']}**", ""]
    split = s["split"] + (f" (k={s['k']})" if s["k"] else "")
    lines += [
        f"- split: {split}, {s['n_folds']} folds, split seed {s['split_seed']}",
        f"- grouping: {s['grouping']}",
        f"- protocol: {s['protocol']}: {s['protocol_note']}",
        f"- methods: {', '.join(s['methods'])}; training seeds: {', '.join(map(str, s['seeds']))}; "
        f"config: {s['config']}, {s['epochs']} epochs",
        f"- data: `{s['data_dir']}`",
        f"- aggregation: {s['aggregation']}",
    ]
    lines += [f"- NOTE: {note}" for note in s["notes"]]
    lines.append("")
    return lines


def _methods_table(s: dict[str, Any]) -> list[str]:
    methods = s["methods"]
    n_runs = {m: s["metrics"][m]["n_runs"] for m in methods}
    lines = [
        "## Mean ± sd over fold x seed runs",
        "",
        "| metric | " + " | ".join(f"{m} ({n_runs[m]} runs)" for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for key, label in SUMMARY_METRICS:
        digits = 1 if key == "n_constant_excluded" else 3
        cells = [_cell(s["metrics"][m][key], n_runs[m], digits) for m in methods]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    missing = any(s["metrics"][m][key]["n"] < n_runs[m] for m in methods for key, _ in SUMMARY_METRICS)
    if missing:
        lines += ["", f"(n=k): only k runs had a value; {N_A_NOTE}."]
    lines.append("")
    return lines


def _folds_table(s: dict[str, Any]) -> list[str]:
    methods = s["methods"]
    labels = dict(SUMMARY_METRICS)
    seeds_text = "mean ± sd over seeds" if len(s["seeds"]) > 1 else "one seed"
    header = ["fold", "test samples (patients)"]
    header += [f"{m} {labels[key]}" for m in methods for key in PER_FOLD_METRICS]
    lines = [f"## Per fold ({seeds_text})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for fold in s["folds"]:
        test = f"{', '.join(fold['test'])} ({', '.join(fold['test_patients'])})"
        name = fold["name"] + (" *" if fold["shared_patients"] else "")
        cells = [name, test]
        n_seeds = len(s["seeds"])
        cells += [
            _cell(s["per_fold"][m][fold["name"]][key], n_seeds) for m in methods for key in PER_FOLD_METRICS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(f["shared_patients"] for f in s["folds"]):
        lines.append("")
        lines.append(f"\\* {SECTION_NOTE}.")
    return lines


def _footer(s: dict[str, Any]) -> list[str]:
    return [
        "",
        f"Command: `{s['command'] or 'run_cv(...)'}`",
        "",
        f"Wall time: {s['wall_time_s']:.1f} s for this invocation ({s['runs_computed_now']} runs computed, "
        f"{s['runs_reused']} reused); recorded train + predict time over all runs "
        f"{s['train_predict_time_s_recorded']:.1f} s.",
        "",
        f"Protocol: {s['protocol']}. {s['protocol_note']}.",
    ]
