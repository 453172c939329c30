"""`cmrcnet cv`: cross-validation in one command (folds -> train -> predict -> evaluate -> summary).

    CV_DIR/
      folds.json                                  split kind, split seed, grouping, patients, folds
      <method>/seed<seed>/<fold>/run/             the training run (config.yaml, checkpoints, bank.pt, ...)
      <method>/seed<seed>/<fold>/pred.h5ad        predictions for the fold's held-out samples
      <method>/seed<seed>/<fold>/timing.json      train + predict seconds of the invocation that ran them
      <method>/seed<seed>/<fold>/eval/metrics.json  evaluation (strict protocol by default); written last
      summary.json, summary.md                    every method side by side

Protocol (EVALUATION.md): the gene list is chosen by `train_run` on each fold's training samples (strict gene
mode), HEG/HVG by `evaluate_predictions` on the training samples (strict protocol), checkpoints by validation
spots of the training samples. A fold's value of a metric is the fold's evaluation `overall` mean: per gene
within each test sample, mean over genes, then mean over the fold's test samples. The summary gives, per
method, the mean and the sample standard deviation (ddof=1) over ALL fold x seed runs (with one seed: over
folds, as EVALUATION.md says), plus per-fold means over seeds and per-seed means over folds.

The folds depend on `split_seed` only (kfold shuffling), never on the training seeds, so every seed sees the same
folds. Resume: a fold is done when its eval/metrics.json exists; an unfinished fold's run is resumed from
last.pt (`train_run(resume=True)`), a complete run is not retrained, a run folder without config.yaml starts
fresh. A rerun with everything finished only rebuilds the summary.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmrcnet.atomic import write_json, write_text
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.splits import SPLIT_KINDS, Fold, describe_folds, make_folds
from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.evaluation.evaluate import (
    PROTOCOL_LABEL,
    PROTOCOL_NOTE,
    SYNTHETIC_NOTE,
    evaluate_predictions,
)
from cmrcnet.inference.predict import predict_samples
from cmrcnet.models.config import METHODS
from cmrcnet.run.config import RunConfig, load_run_config
from cmrcnet.run.layout import BANK_FILE, CONFIG_FILE, LAST_CKPT, RUN_FILE
from cmrcnet.training.distributed import dist_from_env
from cmrcnet.workflows.train import train_run

logger = logging.getLogger(__name__)

FOLDS_FILE = "folds.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
RUN_SUBDIR = "run"  # inside <method>/seed<seed>/<fold>/
PRED_FILE = "pred.h5ad"
EVAL_SUBDIR = "eval"
TIMING_FILE = "timing.json"
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
SECTION_NOTE = (
    "section-level split: other sections of the same patient were in training; expect optimistic results"
)


@dataclass
class CvRun:
    """One (method, seed, fold) cell of the cross-validation and its folder."""

    method: str
    seed: int
    fold: Fold
    dir: Path  # CV_DIR/<method>/seed<seed>/<fold>

    @property
    def run_dir(self) -> Path:
        return self.dir / RUN_SUBDIR

    @property
    def pred_path(self) -> Path:
        return self.dir / PRED_FILE

    @property
    def eval_dir(self) -> Path:
        return self.dir / EVAL_SUBDIR

    @property
    def metrics_path(self) -> Path:
        return self.eval_dir / "metrics.json"

    @property
    def done(self) -> bool:
        return self.metrics_path.is_file()

    @property
    def label(self) -> str:
        return f"{self.method} seed {self.seed} fold {self.fold.name}"


@dataclass
class CvResult:
    out_dir: Path
    folds: list[Fold]
    summary: dict[str, Any]
    n_computed: int  # runs trained/predicted/evaluated (or finished) by this invocation
    n_reused: int  # runs already finished before this invocation
    files: list[Path] = field(default_factory=list)


# --- options ------------------------------------------------------------------------------------------------
def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """Methods from "cmrcnet,bleep" or a list: validated and de-duplicated."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    methods = list(dict.fromkeys(m.strip() for m in items if m.strip()))
    if not methods:
        raise ConfigError("no method given; choose from " + ", ".join(METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return methods


def parse_seeds(spec: str | Sequence[int]) -> list[int]:
    """Seeds from "0,1,2" or a list: non-negative integers, de-duplicated."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    seeds: list[int] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"seeds must be integers, got {text!r}") from None
        if value < 0:
            raise ConfigError(f"seeds must be >= 0, got {value}")
        seeds.append(value)
    if not seeds:
        raise ConfigError("no seed given (e.g. --seeds 0,1,2)")
    return list(dict.fromkeys(seeds))


def _grouping(split: str, samples: list[str], patients: dict[str, str]) -> str:
    if split == "leave-one-sample-out":
        return "by sample (section-level: each sample is a test fold; its patient's other sections train)"
    if all(patients[s] == s for s in samples):
        return "by sample (no patient ids in the metadata: each sample counts as its own patient)"
    return "by patient (no patient is on both sides of a fold)"


def plan_folds(
    data_dir: str | Path,
    *,
    split: str,
    samples: Sequence[str] | None = None,
    k: int = 5,
    split_seed: int = 0,
) -> dict[str, Any]:
    """The cross-validation plan written to folds.json: samples, patients, grouping and folds.

    `samples` defaults to every sample of the dataset that has an image. Unknown samples, samples without
    image and impossible splits raise (before anything is trained).
    """
    if split not in SPLIT_KINDS:
        raise ConfigError(f"unknown split {split!r}; choose from {', '.join(SPLIT_KINDS)}")
    dataset = PreparedDataset(data_dir)
    if samples is None:
        ids = [s for s in dataset.sample_ids() if dataset.has_image(s)]
        if not ids:
            raise InputFileError("no sample with an image in this dataset", path=dataset.root)
    else:
        ids = sorted({str(s) for s in samples})  # sorted: the folds do not depend on the order given
        dataset.require(ids)
        no_image = [s for s in ids if not dataset.has_image(s)]
        if no_image:
            raise ConfigError(
                f"cross-validation samples need images; {no_image} are expression-only "
                "(leave them out of --samples)"
            )
    patients = {s: dataset.patient(s) for s in ids}
    folds = make_folds(ids, patients, kind=split, k=k, seed=split_seed)  # type: ignore[arg-type]
    return {
        "split": split,
        "k": k if split == "kfold" else None,
        "split_seed": split_seed,
        "grouping": _grouping(split, ids, patients),
        "samples": ids,
        "patients": patients,
        "synthetic": any(bool(dataset.metadata(s).get("synthetic")) for s in ids),
        "data_dir": str(dataset.root.resolve()),
        "folds": [f.to_dict() for f in folds],
    }


def _check_same_plan(path: Path, plan: dict[str, Any]) -> None:
    """A CV_DIR holds one cross-validation: refuse to mix folds of a different split into it."""
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"corrupt folds file ({exc})", path=path) from exc
    keys = ("split", "k", "split_seed", "samples", "folds")
    differ = [key for key in keys if old.get(key) != plan[key]]
    if differ:
        raise ConfigError(
            f"{path.parent} holds a different cross-validation ({', '.join(differ)} differ from the "
            "options given now); use the original options to resume it, or choose another --out"
        )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_saved_config(run: CvRun, cfg: RunConfig) -> None:
    """An existing run must have been started with the configuration asked for now (no mixed configs)."""
    path = run.run_dir / CONFIG_FILE
    if not path.is_file():
        return
    saved, wanted = _flatten(load_run_config(path).to_dict()), _flatten(cfg.to_dict())
    differ = sorted(key for key in set(saved) | set(wanted) if saved.get(key) != wanted.get(key))
    if differ:
        raise ConfigError(
            f"{run.run_dir} was started with a different configuration ({', '.join(differ)}); use the "
            "original --config/--epochs to resume this cross-validation, or choose another --out"
        )


def _run_complete(run: CvRun) -> bool:
    """True when training finished (run.json status complete, last.pt and, for retrieval, bank.pt present)."""
    try:
        info = json.loads((run.run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if info.get("status") != "complete" or not (run.run_dir / LAST_CKPT).is_file():
        return False
    return run.method == "regression" or (run.run_dir / BANK_FILE).is_file()


# --- running ------------------------------------------------------------------------------------------------
def run_cv(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    split: str,
    methods: str | Sequence[str] = ("cmrcnet",),
    config: str | Path | RunConfig = "cpu",
    seeds: str | Sequence[int] = (0,),
    samples: Sequence[str] | None = None,
    k: int = 5,
    split_seed: int = 0,
    epochs: int | None = None,
    precision: str | None = None,
    markers: list[str] | None = None,
    protocol: str = "strict",
    device: str = "cpu",
    plots: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> CvResult:
    """Cross-validate `methods` x `seeds` over the folds of `split`; write everything into `out_dir`.

    Args:
        data_dir: prepared dataset folder.
        out_dir: CV_DIR (created if needed; an interrupted cross-validation in it is resumed).
        split: "leave-one-sample-out", "leave-one-patient-out" or "kfold" (`k` folds of patients, shuffled
            with `split_seed`).
        methods: "cmrcnet", "bleep", "regression" (comma-separated string or list).
        config: preset name, YAML file or RunConfig; `epochs` overrides its epochs; `method` and `train.seed`
            are set per run.
        seeds: training seeds; every seed uses the same folds.
        precision: overrides the config's precision ("auto", "fp32", "bf16", "fp16"; see
            `cmrcnet.runtime.resolve_precision`).
        samples: sample ids to split (default: every sample of the dataset with an image).
        markers: marker genes for the evaluation (None: the default panel).
        protocol: "strict" (default) or "paper" (labelled in every output).
        plots: expression maps in each fold's eval/ folder (off by default: slow).

    Returns:
        CvResult with the summary dict written to summary.json.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    if dist_from_env().enabled:
        raise ConfigError("run `cmrcnet cv` as a single process (not under torchrun)")
    if protocol not in PROTOCOL_LABEL:
        raise ConfigError(f"protocol must be 'strict' or 'paper', got {protocol!r}")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    method_list, seed_list = parse_methods(methods), parse_seeds(seeds)
    base = copy.deepcopy(config) if isinstance(config, RunConfig) else load_run_config(config)
    if epochs is not None:
        base.train.epochs = epochs
    if precision is not None:
        base.train.precision = precision
    plan = plan_folds(data_dir, split=split, samples=samples, k=k, split_seed=split_seed)
    folds = [Fold(**f) for f in plan["folds"]]
    patients = plan["patients"]

    configs: dict[tuple[str, int], RunConfig] = {}
    for method in method_list:
        for seed in seed_list:
            cfg = copy.deepcopy(base)
            cfg.method, cfg.train.seed = method, seed
            cfg.validate()
            configs[method, seed] = cfg
    runs = [
        CvRun(m, s, f, out / m / f"seed{s}" / f.name) for m in method_list for s in seed_list for f in folds
    ]
    folds_path = out / FOLDS_FILE
    _check_same_plan(folds_path, plan)
    for run in runs:  # every check before the first (long) training; finished runs too (no mixed configs)
        _check_saved_config(run, configs[run.method, run.seed])

    logger.info(
        "cross-validation: %s, %d folds, grouping %s, split seed %d\n%s",
        split,
        len(folds),
        plan["grouping"],
        split_seed,
        describe_folds(folds, patients),
    )
    shared = {f.name: f.shared_patients for f in folds if f.shared_patients}
    if shared:
        logger.warning("%s (folds %s)", SECTION_NOTE, sorted(shared))
    write_json(folds_path, plan)

    n_reused = sum(run.done for run in runs)
    todo = [run for run in runs if not run.done]
    if n_reused:
        logger.info("resuming: %d of %d runs already finished", n_reused, len(runs))
    for i, run in enumerate(todo, 1):
        logger.info("[%d/%d] %s: test %s", i, len(todo), run.label, run.fold.test)
        _run_one(
            run,
            configs[run.method, run.seed],
            data_dir,
            all_samples=plan["samples"],
            markers=markers,
            protocol=protocol,
            device=device,
            plots=plots,
            progress=progress,
            command=command,
        )

    summary = summarize_cv(
        runs,
        plan,
        out,
        protocol=protocol,
        command=command,
        config_name=config if isinstance(config, str | Path) else "RunConfig object",
        epochs=base.train.epochs,
        wall_time_s=time.perf_counter() - t_start,
        n_computed=len(todo),
        n_reused=n_reused,
    )
    write_json(out / SUMMARY_JSON, summary)
    write_text(out / SUMMARY_MD, summary_markdown(summary))
    logger.info("cross-validation summary written to %s", out / SUMMARY_MD)
    return CvResult(
        out, folds, summary, len(todo), n_reused, [folds_path, out / SUMMARY_JSON, out / SUMMARY_MD]
    )


def _run_one(
    run: CvRun,
    cfg: RunConfig,
    data_dir: str | Path,
    *,
    all_samples: list[str],
    markers: list[str] | None,
    protocol: str,
    device: str,
    plots: bool,
    progress: bool,
    command: str | None,
) -> None:
    """Train (or resume, or skip a finished training), predict the held-out samples, evaluate (metrics last)."""
    t0 = time.perf_counter()
    if _run_complete(run):
        logger.info("%s: training already complete, not retrained", run.label)
    else:
        resume = (run.run_dir / CONFIG_FILE).is_file()
        if resume:
            logger.info("%s: resuming the unfinished run in %s", run.label, run.run_dir)
        train_run(
            data_dir=data_dir,
            train_samples=list(run.fold.train),
            out_dir=run.run_dir,
            config=copy.deepcopy(cfg),
            device=device,
            resume=resume,
            progress=progress,
            all_samples_for_paper_genes=all_samples,
            command=f"{command or 'cmrcnet cv'} [{run.label}]",
        )
    t_train = time.perf_counter() - t0
    predict_samples(
        run.run_dir,
        data_dir,
        run.fold.test,
        run.pred_path,
        precision=cfg.train.precision,
        device=device,
        progress=progress,
    )
    t_pred = time.perf_counter() - t0 - t_train
    write_json(run.dir / TIMING_FILE, {"train_s": round(t_train, 3), "predict_s": round(t_pred, 3)})
    evaluate_predictions(
        run.pred_path, data_dir, run.eval_dir, markers=markers, protocol=protocol, n_top=N_TOP, plots=plots
    )


# --- summary ------------------------------------------------------------------------------------------------
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
    """Collect every run's eval/metrics.json into the summary dict (see AGGREGATION)."""
    methods = list(dict.fromkeys(r.method for r in runs))
    seeds = list(dict.fromkeys(r.seed for r in runs))
    fold_names = list(dict.fromkeys(r.fold.name for r in runs))
    keys = [key for key, _ in SUMMARY_METRICS]
    rows, synthetic, gene_modes, train_predict_s = [], bool(plan.get("synthetic")), {}, 0.0
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

    def select(**where: Any) -> list[dict[str, Any]]:
        return [r for r in rows if all(r[k] == v for k, v in where.items())]

    metrics, per_fold, per_seed = {}, {}, {}
    for method in methods:
        mine = select(method=method)
        metrics[method] = {key: _stats([r["values"][key] for r in mine]) for key in keys}
        metrics[method]["n_runs"] = len(mine)
        metrics[method]["n_constant_excluded_total"] = sum(r["n_constant_excluded_total"] for r in mine)
        per_fold[method] = {
            f: {key: _stats([r["values"][key] for r in select(method=method, fold=f)]) for key in keys}
            for f in fold_names
        }
        per_seed[method] = {
            str(s): {key: _stats([r["values"][key] for r in select(method=method, seed=s)]) for key in keys}
            for s in seeds
        }
    folds_by_name = {f["name"]: f for f in plan["folds"]}
    shared = {name: f["shared_patients"] for name, f in folds_by_name.items() if f["shared_patients"]}
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
        "folds": [
            {
                "name": name,
                "test": folds_by_name[name]["test"],
                "test_patients": sorted({plan["patients"][s] for s in folds_by_name[name]["test"]}),
                "train": folds_by_name[name]["train"],
                "shared_patients": folds_by_name[name]["shared_patients"],
            }
            for name in fold_names
        ],
        "notes": notes,
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


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(stats: dict[str, Any], n_expected: int, digits: int = 3) -> str:
    """Mean ± sd as text, with "(n=k)" when only k of the n_expected runs had a value."""
    if stats["mean"] is None:
        return "n/a"
    text = _fmt(stats["mean"], digits) + ("" if stats["std"] is None else f" ± {_fmt(stats['std'], digits)}")
    return text + (f" (n={stats['n']})" if stats["n"] < n_expected else "")


def summary_markdown(s: dict[str, Any]) -> str:
    """summary.md: methods side by side, then per-fold means; protocol, split, notes, command, wall time."""
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

    methods = s["methods"]
    n_runs = {m: s["metrics"][m]["n_runs"] for m in methods}
    lines += [
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

    labels = dict(SUMMARY_METRICS)
    seeds_text = "mean ± sd over seeds" if len(s["seeds"]) > 1 else "one seed"
    header = ["fold", "test samples (patients)"]
    header += [f"{m} {labels[key]}" for m in methods for key in PER_FOLD_METRICS]
    lines += [f"## Per fold ({seeds_text})", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
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
    lines += [
        "",
        f"Command: `{s['command'] or 'run_cv(...)'}`",
        "",
        f"Wall time: {s['wall_time_s']:.1f} s for this invocation ({s['runs_computed_now']} runs computed, "
        f"{s['runs_reused']} reused); recorded train + predict time over all runs "
        f"{s['train_predict_time_s_recorded']:.1f} s.",
        "",
        f"Protocol: {s['protocol']}. {s['protocol_note']}.",
    ]
    return "\n".join(lines) + "\n"
