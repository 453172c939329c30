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

Modules: `cv_plan` (layout, options, folds, checks), `cv_summary` (statistics), `cv_markdown` (summary.md); this
one runs the folds.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmrcnet.atomic import write_json, write_text
from cmrcnet.constants import DEFAULT_SMOOTH
from cmrcnet.data.splits import Fold, describe_folds
from cmrcnet.data.stain import DEFAULT_STAIN_RULE
from cmrcnet.errors import ConfigError
from cmrcnet.evaluation.evaluate import PROTOCOL_LABEL, evaluate_predictions
from cmrcnet.inference.predict import predict_samples
from cmrcnet.run.config import RunConfig, load_run_config
from cmrcnet.run.layout import CONFIG_FILE
from cmrcnet.training.distributed import dist_from_env
from cmrcnet.workflows.cv_markdown import summary_markdown
from cmrcnet.workflows.cv_plan import (
    EVAL_SUBDIR,
    FOLDS_FILE,
    PRED_FILE,
    RUN_SUBDIR,
    SECTION_NOTE,
    SUMMARY_JSON,
    SUMMARY_MD,
    TIMING_FILE,
    CvRun,
    check_same_plan,
    check_saved_config,
    parse_methods,
    parse_seeds,
    plan_folds,
    run_complete,
)
from cmrcnet.workflows.cv_summary import N_TOP, SUMMARY_METRICS, summarize_cv
from cmrcnet.workflows.train import train_run

__all__ = [
    "EVAL_SUBDIR",
    "FOLDS_FILE",
    "N_TOP",
    "PRED_FILE",
    "RUN_SUBDIR",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "SUMMARY_METRICS",
    "CvResult",
    "CvRun",
    "parse_methods",
    "parse_seeds",
    "plan_folds",
    "run_cv",
    "summarize_cv",
    "summary_markdown",
]

logger = logging.getLogger(__name__)


@dataclass
class CvResult:
    out_dir: Path
    folds: list[Fold]
    summary: dict[str, Any]
    n_computed: int  # runs trained/predicted/evaluated (or finished) by this invocation
    n_reused: int  # runs already finished before this invocation
    files: list[Path] = field(default_factory=list)


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
    smooth: float = DEFAULT_SMOOTH,
    stain_normalise: bool | None = None,
    stain_rule: str = DEFAULT_STAIN_RULE,
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
        smooth: weight of the neighbouring spots' predictions (`cmrcnet.inference.smoothing`; default 0.5,
            0: none).
        stain_normalise: map each held-out sample's colours onto its fold's training patches before
            prediction (None: the default of predict, `cmrcnet.constants.DEFAULT_STAIN_NORMALISE`), by
            `stain_rule` (`cmrcnet.data.stain`).

    Returns:
        CvResult with the summary dict written to summary.json.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    _check_options(protocol, epochs)
    method_list, seed_list = parse_methods(methods), parse_seeds(seeds)
    base = _base_config(config, epochs=epochs, precision=precision)
    plan = plan_folds(data_dir, split=split, samples=samples, k=k, split_seed=split_seed)
    folds = [Fold(**f) for f in plan["folds"]]
    configs = _run_configs(base, method_list, seed_list)
    runs = [
        CvRun(m, s, f, out / m / f"seed{s}" / f.name) for m in method_list for s in seed_list for f in folds
    ]
    folds_path = out / FOLDS_FILE
    check_same_plan(folds_path, plan)
    for run in runs:  # every check before the first (long) training; finished runs too (no mixed configs)
        check_saved_config(run, configs[run.method, run.seed])
    _log_plan(plan, folds)
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
            smooth=smooth,
            stain_normalise=stain_normalise,
            stain_rule=stain_rule,
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


def _check_options(protocol: str, epochs: int | None) -> None:
    """One process, a known protocol and a positive number of epochs."""
    if dist_from_env().enabled:
        raise ConfigError("run `cmrcnet cv` as a single process (not under torchrun)")
    if protocol not in PROTOCOL_LABEL:
        raise ConfigError(f"protocol must be 'strict' or 'paper', got {protocol!r}")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")


def _base_config(config: str | Path | RunConfig, *, epochs: int | None, precision: str | None) -> RunConfig:
    """The configuration every run starts from (a copy), with the epochs and precision asked for."""
    base = copy.deepcopy(config) if isinstance(config, RunConfig) else load_run_config(config)
    if epochs is not None:
        base.train.epochs = epochs
    if precision is not None:
        base.train.precision = precision
    return base


def _run_configs(base: RunConfig, methods: list[str], seeds: list[int]) -> dict[tuple[str, int], RunConfig]:
    """One validated configuration per (method, seed)."""
    configs: dict[tuple[str, int], RunConfig] = {}
    for method in methods:
        for seed in seeds:
            cfg = copy.deepcopy(base)
            cfg.method, cfg.train.seed = method, seed
            cfg.validate()
            configs[method, seed] = cfg
    return configs


def _log_plan(plan: dict[str, Any], folds: list[Fold]) -> None:
    logger.info(
        "cross-validation: %s, %d folds, grouping %s, split seed %d\n%s",
        plan["split"],
        len(folds),
        plan["grouping"],
        plan["split_seed"],
        describe_folds(folds, plan["patients"]),
    )
    shared = {f.name: f.shared_patients for f in folds if f.shared_patients}
    if shared:
        logger.warning("%s (folds %s)", SECTION_NOTE, sorted(shared))


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
    smooth: float = DEFAULT_SMOOTH,
    stain_normalise: bool | None = None,
    stain_rule: str = DEFAULT_STAIN_RULE,
) -> None:
    """Train (or resume, or skip a finished training), predict the held-out samples, evaluate (metrics last)."""
    t0 = time.perf_counter()
    if run_complete(run):
        logger.info("%s: training already complete, not retrained", run.label)
    else:
        resume = (run.run_dir / CONFIG_FILE).is_file()
        if resume:
            logger.info("%s: resuming the unfinished run in %s", run.label, run.run_dir)
        train_run(
            data_dir=data_dir,
            train_samples=list(run.fold.train),
            run_dir=run.run_dir,
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
        smooth=smooth,
        stain_normalise=stain_normalise,
        stain_rule=stain_rule,
    )
    t_pred = time.perf_counter() - t0 - t_train
    write_json(run.dir / TIMING_FILE, {"train_s": round(t_train, 3), "predict_s": round(t_pred, 3)})
    evaluate_predictions(
        run.pred_path, data_dir, run.eval_dir, markers=markers, protocol=protocol, n_top=N_TOP, plots=plots
    )
