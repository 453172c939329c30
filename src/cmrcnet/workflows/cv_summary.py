"""Cross-validation summary: every fold's evaluation collected into summary.json (see AGGREGATION)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmrcnet.errors import InputFileError
from cmrcnet.evaluation.evaluate import PROTOCOL_LABEL, PROTOCOL_NOTE, SYNTHETIC_NOTE
from cmrcnet.workflows.cv_plan import SECTION_NOTE, TIMING_FILE, CvRun

N_TOP = 50  # HEG-50 / HVG-50
# (key of the evaluation's `overall`, label in summary.md)
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    (f"pcc_heg{N_TOP}", f"PCC HEG-{N_TOP}"),
    (f"pcc_hvg{N_TOP}", f"PCC HVG-{N_TOP}"),
    ("pcc_markers", "PCC markers"),
    ("pcc_all", "PCC all genes"),
    ("mse", "MSE"),
    ("mae", "MAE"),
    ("spotwise_pcc", "spot-wise PCC"),
    ("gene_gene_corr", "gene-gene corr"),
    ("n_constant_excluded", "constant genes excluded (per test sample)"),
)
PER_FOLD_METRICS = (f"pcc_heg{N_TOP}", f"pcc_hvg{N_TOP}", "pcc_all")  # columns of the per-fold table
AGGREGATION = (
    "fold value: the fold's evaluation (PCC per gene within each test sample, mean over genes, then mean over "
    "the fold's test samples; constant genes excluded and counted); summary: mean and sample standard "
    "deviation (ddof=1) over all fold x seed runs; per_fold: mean (and std) over seeds; per_seed: mean (and "
    "std) over folds"
)
N_A_NOTE = (
    "a run has no value when no gene of the set has a PCC (an empty marker set, or every gene constant on the "
    "test samples in the measured data or in the prediction, e.g. a collapsed model); such runs are left out, "
    "never counted as 0"
)


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def _stats(values: Sequence[Any]) -> dict[str, Any]:
    """mean, sample std (ddof=1; None below 2 values) and count of the finite values (None: no value)."""
    v = _finite(values)
    n = len(v)
    mean = sum(v) / n if n else None
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def _read_metrics(run: CvRun) -> dict[str, Any]:
    try:
        return json.loads(run.metrics_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(
            f"unreadable fold metrics ({exc}); delete it to redo this fold", path=run.metrics_path
        ) from exc


def summarize_cv(
    runs: Sequence[CvRun],
    plan: dict[str, Any],
    out_dir: Path,
    *,
    protocol: str,
    command: str | None,
    config_name: str | Path,
    epochs: int,
    wall_time_s: float,
    n_computed: int,
    n_reused: int,
) -> dict[str, Any]:
    """Collect every run's eval/metrics.json into the summary dict written to summary.json.

    Parameters
    ----------
    runs
        Every (method, seed, fold) run of the cross-validation, each with its eval/metrics.json.
    plan
        The plan written to folds.json (`cmrcnet.workflows.cv_plan.plan_folds`).
    out_dir
        The CV_DIR (metrics paths are recorded relative to it).
    protocol
        "strict" or "paper".
    command, config_name, epochs
        Recorded as given.
    wall_time_s, n_computed, n_reused
        This invocation's wall time, the runs it computed and the runs already finished.

    Returns
    -------
    dict
        Means and sample standard deviations per method over all runs, per fold and per seed (see
        AGGREGATION), every run's row, the folds, the notes and the provenance.
    """
    rows, synthetic, gene_modes, train_predict_s = _collect_rows(runs, out_dir)
    synthetic = synthetic or bool(plan.get("synthetic"))
    fold_names = list(dict.fromkeys(r.fold.name for r in runs))
    methods = list(dict.fromkeys(r.method for r in runs))
    seeds = list(dict.fromkeys(r.seed for r in runs))
    metrics, per_fold, per_seed = _aggregate(rows, methods, fold_names, seeds)
    return {
        "kind": "cmrcnet cross-validation summary",
        "protocol": PROTOCOL_LABEL[protocol],
        "protocol_id": protocol,
        "protocol_note": PROTOCOL_NOTE[protocol],
        "synthetic": synthetic,
        "synthetic_note": SYNTHETIC_NOTE if synthetic else None,
        "split": plan["split"],
        "k": plan["k"],
        "split_seed": plan["split_seed"],
        "grouping": plan["grouping"],
        "n_folds": len(fold_names),
        "folds": _fold_records(plan, fold_names),
        "notes": _notes(plan, gene_modes),
        "methods": methods,
        "seeds": seeds,
        "config": str(config_name),
        "epochs": epochs,
        "aggregation": AGGREGATION,
        "std_ddof": 1,
        "metric_labels": dict(SUMMARY_METRICS),
        "metrics": metrics,
        "per_fold": per_fold,
        "per_seed": per_seed,
        "runs": rows,
        "data_dir": plan["data_dir"],
        "command": command,
        "wall_time_s": round(wall_time_s, 3),
        "train_predict_time_s_recorded": round(train_predict_s, 3),
        "runs_computed_now": n_computed,
        "runs_reused": n_reused,
    }


def _collect_rows(
    runs: Sequence[CvRun], out_dir: Path
) -> tuple[list[dict[str, Any]], bool, dict[str, set[str]], float]:
    """(one row per run with its metric values and timing, any synthetic evaluation, gene modes per method,
    recorded train + predict seconds over all runs)."""
    keys = [key for key, _ in SUMMARY_METRICS]
    rows, synthetic, gene_modes, train_predict_s = [], False, {}, 0.0
    for run in runs:
        m = _read_metrics(run)
        overall = m.get("overall", {})
        values = {key: (overall.get(key) or {}).get("mean") for key in keys}
        synthetic = synthetic or bool(m.get("synthetic"))
        gene_modes.setdefault(run.method, set()).add(str(m.get("prediction", {}).get("gene_mode")))
        timing_path = run.dir / TIMING_FILE
        timing = json.loads(timing_path.read_text(encoding="utf-8")) if timing_path.is_file() else {}
        train_predict_s += float(timing.get("train_s", 0.0)) + float(timing.get("predict_s", 0.0))
        rows.append(
            {
                "method": run.method,
                "seed": run.seed,
                "fold": run.fold.name,
                "test_samples": run.fold.test,
                "metrics": str(run.metrics_path.relative_to(out_dir)),
                "values": values,
                "n_constant_excluded_total": sum(
                    int(v or 0) for v in overall.get("n_constant_excluded_per_sample", {}).values()
                ),
                "timing_s": timing or None,
            }
        )
    return rows, synthetic, gene_modes, train_predict_s


def _aggregate(
    rows: list[dict[str, Any]], methods: list[str], fold_names: list[str], seeds: list[int]
) -> tuple[dict, dict, dict]:
    """(statistics per method over all runs, per method and fold over seeds, per method and seed over folds)."""
    keys = [key for key, _ in SUMMARY_METRICS]

    def select(**where: Any) -> list[dict[str, Any]]:
        return [r for r in rows if all(r[k] == v for k, v in where.items())]

    def stats_of(selected: list[dict[str, Any]]) -> dict[str, Any]:
        return {key: _stats([r["values"][key] for r in selected]) for key in keys}

    metrics, per_fold, per_seed = {}, {}, {}
    for method in methods:
        mine = select(method=method)
        metrics[method] = stats_of(mine)
        metrics[method]["n_runs"] = len(mine)
        metrics[method]["n_constant_excluded_total"] = sum(r["n_constant_excluded_total"] for r in mine)
        per_fold[method] = {f: stats_of(select(method=method, fold=f)) for f in fold_names}
        per_seed[method] = {str(s): stats_of(select(method=method, seed=s)) for s in seeds}
    return metrics, per_fold, per_seed


def _notes(plan: dict[str, Any], gene_modes: dict[str, set[str]]) -> list[str]:
    """Warnings for the summary: section-level folds, and gene lists chosen in paper mode."""
    shared = {f["name"]: f["shared_patients"] for f in plan["folds"] if f["shared_patients"]}
    notes = []
    if shared:
        notes.append(
            f"{SECTION_NOTE} (folds {', '.join(sorted(shared))}; shared patients "
            f"{sorted({p for ps in shared.values() for p in ps})})"
        )
    paper_genes = sorted(m for m, modes in gene_modes.items() if "paper" in modes)
    if paper_genes:
        notes.append(
            f"gene list of {paper_genes} chosen in paper mode (union of per-slide HVGs over all slides, test "
            "slides included)"
        )
    return notes


def _fold_records(plan: dict[str, Any], fold_names: list[str]) -> list[dict[str, Any]]:
    """Each fold's test and training samples, test patients and patients shared with training."""
    folds_by_name = {f["name"]: f for f in plan["folds"]}
    return [
        {
            "name": name,
            "test": folds_by_name[name]["test"],
            "test_patients": sorted({plan["patients"][s] for s in folds_by_name[name]["test"]}),
            "train": folds_by_name[name]["train"],
            "shared_patients": folds_by_name[name]["shared_patients"],
        }
        for name in fold_names
    ]
