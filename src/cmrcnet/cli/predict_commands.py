"""The commands bank, predict, evaluate and cv: their arguments and the API calls they make."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cmrcnet.cli._common import (
    PRECISION_HELP,
    _add_k,
    _add_precision,
    _add_smooth,
    _add_stain,
    _id_list,
    _positive_int,
)
from cmrcnet.constants import BANK_ACTIONS
from cmrcnet.errors import ConfigError
from cmrcnet.runtime import PRECISION_CHOICES


def _add_model_and_samples(p: argparse.ArgumentParser) -> None:
    """--model RUN_DIR, --data DATASET_DIR and --samples (bank and predict)."""
    p.add_argument("--model", type=Path, required=True, help="run folder of a trained model")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    p.add_argument("--samples", type=_id_list, required=True, help="comma-separated sample ids")


def _add_markers_and_protocol(p: argparse.ArgumentParser) -> None:
    """--markers and --protocol (evaluate and cv)."""
    from cmrcnet.evaluation.evaluate import PROTOCOLS

    p.add_argument("--markers", help="comma-separated marker genes or a file with one gene per line")
    p.add_argument("--protocol", choices=PROTOCOLS, default="strict", help="gene-set protocol")


# --- bank -------------------------------------------------------------------------------------------------
def _add_bank(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bank",
        parents=[common],
        help="build or extend a run's reference bank of measured spots",
        description="The reference bank holds expression embeddings of measured spots; prediction retrieves "
        "the most similar ones. `build` replaces it with the given samples, `add` adds samples (replacing "
        "earlier versions of the same samples). Samples without an image (expression only) are welcome. "
        "A run whose retrieval k is 'auto' (the default) chooses k again for the new bank.",
    )
    p.add_argument("action", choices=BANK_ACTIONS, help="build: start from scratch; add: extend")
    _add_model_and_samples(p)
    p.add_argument("--allow-missing-genes", action="store_true", help="fill genes a sample lacks with zeros")
    p.set_defaults(handler=_run_bank)


def _run_bank(args: argparse.Namespace) -> int:
    from cmrcnet.run.load import load_trained_model
    from cmrcnet.workflows.bank import update_bank

    done = update_bank(
        load_trained_model(args.model),
        args.data,
        args.samples,
        action=args.action,
        allow_missing_genes=args.allow_missing_genes,
        progress=not args.quiet,
    )
    print(f"reference bank {done.path}: {len(done.bank)} spots from samples {done.bank.samples}")
    print(f"retrieval k: {done.k if done.k is not None else 'unchanged'} ({done.k_note})")
    return 0


# --- predict ----------------------------------------------------------------------------------------------
def _add_predict(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "predict",
        parents=[common],
        help="predict expression for prepared samples (AnnData out)",
        description="Embed every patch of the given samples and predict log1p expression as the average of "
        "the k most similar spots of the reference bank (or directly, for the regression method). A sample "
        "never retrieves its own spots.",
    )
    from cmrcnet.inference.retrieval import BACKENDS, WEIGHTINGS
    from cmrcnet.run.layout import CHECKPOINTS

    _add_model_and_samples(p)
    p.add_argument("--out", type=Path, required=True, help="output .h5ad (spots x genes)")
    _add_k(p)
    p.add_argument("--weighting", choices=WEIGHTINGS, help="plain (paper) or similarity-weighted")
    p.add_argument("--backend", choices=BACKENDS, default="exact", help="search backend")
    p.add_argument("--checkpoint", choices=CHECKPOINTS, help="default: the run's `select` setting")
    p.add_argument("--ema", action="store_true", default=None, help="use the EMA weights")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="patches per forward pass")
    _add_stain(p)
    _add_smooth(p, "spot")
    _add_precision(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from cmrcnet import api

    if args.out.suffix != ".h5ad":
        raise ConfigError(f"--out must end in .h5ad, got {args.out}")
    adata = api.predict(
        args.model,
        args.data,
        args.samples,
        out=args.out,
        checkpoint=args.checkpoint,
        use_ema=args.ema,
        k=args.k,
        weighting=args.weighting,
        backend=args.backend,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        progress=not args.quiet,
        stain_normalise=args.stain_normalise,
        stain_rule=args.stain_rule,
        smooth=args.smooth,
    )
    info = adata.uns["cmrcnet"]
    print(f"predicted {adata.n_obs} spots x {adata.n_vars} genes ({info['method']}) -> {args.out}")
    return 0


# --- evaluate ---------------------------------------------------------------------------------------------
def _add_evaluate(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="compare predictions with measured expression (metrics + plots)",
        description="Per test sample and overall: mean PCC over HEG-50, HVG-50, markers and all genes, MSE, "
        "MAE, spot-wise PCC, gene-gene correlation preservation, genes excluded as constant. strict (default): "
        "HEG/HVG chosen on the training samples; paper: on the test sample (labelled 'paper protocol').",
    )
    p.add_argument("--pred", type=Path, required=True, help="prediction .h5ad from `cmrcnet predict`")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder with measured counts")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics.json, genes.csv and plots")
    _add_markers_and_protocol(p)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG maps")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from cmrcnet import api
    from cmrcnet.data.markers import parse_markers

    metrics = api.evaluate(
        args.pred,
        args.data,
        args.out,
        markers=parse_markers(args.markers),
        protocol=args.protocol,
        plots=not args.no_plots,
    )
    print(
        (Path(args.out) / "summary.md").read_text(encoding="utf-8")
        if (Path(args.out) / "summary.md").exists()
        else metrics
    )
    return 0


# --- cv -----------------------------------------------------------------------------------------------------
def _add_cv(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from cmrcnet.data.splits import SPLIT_KINDS

    p = sub.add_parser(
        "cv",
        parents=[common],
        help="cross-validation: train, predict and evaluate every fold, then summarise",
        description="Split the samples into folds (grouped by patient where known), then for each method x "
        "seed x fold: train on the fold's training samples (genes chosen on them), predict the held-out "
        "samples and evaluate them (strict protocol by default). Writes CV_DIR/folds.json, one folder per "
        "run and summary.json/summary.md (mean ± sd over all fold x seed runs, methods side by side). An "
        "interrupted cv resumes at the next unfinished fold when run again with the same options.",
    )
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    p.add_argument("--split", required=True, choices=SPLIT_KINDS, help="how to form the folds")
    p.add_argument("--k", type=_positive_int, default=5, help="number of folds for --split kfold (default 5)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the kfold patient shuffle (default 0)")
    p.add_argument("--out", type=Path, required=True, help="cross-validation folder CV_DIR")
    p.add_argument(
        "--method",
        default="cmrcnet",
        help="comma-separated methods: cmrcnet, bleep, regression (default cmrcnet)",
    )
    p.add_argument("--config", default="cpu", help="preset (paper, cpu, tiny) or YAML file (default cpu)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    p.add_argument(
        "--samples", type=_id_list, help="comma-separated sample ids (default: every sample with an image)"
    )
    p.add_argument("--epochs", type=_positive_int, help="number of epochs (overrides the config)")
    _add_markers_and_protocol(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, help=PRECISION_HELP + "; overrides the config")
    p.add_argument("--plots", action="store_true", help="draw expression maps for every fold (slow)")
    _add_smooth(p, "spot")
    _add_stain(p)
    p.set_defaults(handler=_run_cv)


def _run_cv(args: argparse.Namespace) -> int:
    from cmrcnet import api
    from cmrcnet.data.markers import parse_markers
    from cmrcnet.workflows.cv import SUMMARY_MD

    result = api.cv(
        args.data,
        args.out,
        split=args.split,
        methods=args.method,
        config=args.config,
        seeds=args.seeds,
        samples=args.samples,
        k=args.k,
        split_seed=args.split_seed,
        epochs=args.epochs,
        precision=args.precision,
        markers=parse_markers(args.markers),
        protocol=args.protocol,
        device=args.device,
        plots=args.plots,
        progress=not args.quiet,
        smooth=args.smooth,
        stain_normalise=args.stain_normalise,
        stain_rule=args.stain_rule,
        command=" ".join(["cmrcnet", *sys.argv[1:]]),
    )
    print((result.out_dir / SUMMARY_MD).read_text(encoding="utf-8"))
    return 0
