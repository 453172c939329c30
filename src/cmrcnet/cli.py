"""Command-line interface. The only module that parses arguments, configures logging and prints.

User errors (CmrcnetError) print one line naming the file and the problem and exit with code 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from cmrcnet import __version__
from cmrcnet.constants import DEFAULT_FOV_UM, DEFAULT_PATCH_PX
from cmrcnet.errors import CmrcnetError, ConfigError, InputFileError
from cmrcnet.runtime import PRECISION_CHOICES

logger = logging.getLogger("cmrcnet")

Handler = Callable[[argparse.Namespace], int]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `cmrcnet train: error: argument --precision: invalid choice ...`, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


PRECISION_HELP = (
    "compute precision: auto (default: bf16 on GPUs that support it, else fp16; on the CPU bf16 only where a "
    "short GEMM probe measures it faster than fp32, else fp32), fp32, bf16, fp16 (CUDA only)"
)


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto", help=PRECISION_HELP)


def _id_list(text: str) -> list[str]:
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("expected a comma-separated list of ids")
    return ids


# --- prepare ------------------------------------------------------------------------------------------------
def _add_prepare(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "prepare",
        parents=[common],
        help="add one sample (ST, Visium, HEST or AnnData) to a prepared dataset folder",
        description="Read one sample, cut fixed field-of-view patches around its spots and write it into "
        "DATASET_DIR (HEST-compatible layout: patches/<id>.h5, st/<id>.h5ad, metadata/<id>.json).",
    )
    p.add_argument(
        "--format", required=True, choices=["st", "visium", "hest", "anndata"], help="input format"
    )
    p.add_argument(
        "--input",
        type=Path,
        help="input folder (st: her2st-like layout; visium: Space Ranger outs; "
        "hest: HEST-1k root) or .h5ad file (anndata)",
    )
    p.add_argument("--counts", type=Path, help="st only: counts .tsv[.gz] (instead of --input)")
    p.add_argument("--spots", type=Path, help="st only: *_selection.tsv spot table (instead of --input)")
    p.add_argument("--image", type=Path, help="H&E image (full resolution) when not found in --input")
    p.add_argument("--sample-id", help="sample id (required for st, hest and anndata)")
    p.add_argument("--patient", help="patient id (default: from metadata, else the sample id)")
    p.add_argument(
        "--pixel-size",
        type=_positive_float,
        help="micrometres per full-resolution pixel "
        "(default: from metadata, else estimated from the spot grid)",
    )
    p.add_argument(
        "--fov-um",
        type=_positive_float,
        default=DEFAULT_FOV_UM,
        help=f"physical side of each patch in um (default {DEFAULT_FOV_UM:g})",
    )
    p.add_argument(
        "--patch-px",
        type=_positive_int,
        default=DEFAULT_PATCH_PX,
        help=f"patch side in pixels after resampling (default {DEFAULT_PATCH_PX})",
    )
    p.add_argument("--out", type=Path, required=True, help="prepared dataset folder (created if needed)")
    p.set_defaults(handler=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from cmrcnet import api

    if args.format == "st" and args.input is None and (args.counts is None or args.spots is None):
        raise ConfigError("--format st needs --input DIR --sample-id ID, or --counts FILE --spots FILE")
    if args.format != "st" and args.input is None:
        raise ConfigError(f"--format {args.format} needs --input")
    if args.format in ("st", "hest", "anndata") and not args.sample_id:
        raise ConfigError(f"--format {args.format} needs --sample-id")
    kwargs = {
        "sample_id": args.sample_id,
        "patient_id": args.patient,
        "pixel_size_um": args.pixel_size,
        "image": args.image,
    }
    if args.format == "st" and args.input is None:
        kwargs.update(counts=args.counts, spots=args.spots)
    else:
        kwargs["input"] = args.input
    sample = api.read(args.format, **kwargs)
    summary = api.prepare(
        sample, args.out, fov_um=args.fov_um, patch_px=args.patch_px, progress=not args.quiet
    )
    print("\n".join(summary.lines()))
    return 0


# --- demo ---------------------------------------------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="generate a SYNTHETIC dataset and run the pipeline on it",
        description="Generate a small SYNTHETIC spatial-transcriptomics dataset (procedural tissue-like images "
        "whose gene programs follow visible morphology), prepare it, and run the pipeline on it.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder for the demo")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--slides", type=_positive_int, default=4, help="number of synthetic slides (default 4)")
    p.add_argument("--epochs", type=_positive_int, default=8, help="training epochs (default 8)")
    _add_precision(p)
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from cmrcnet.demo import run_demo

    report = run_demo(
        args.out,
        seed=args.seed,
        n_slides=args.slides,
        epochs=args.epochs,
        precision=args.precision,
        progress=not args.quiet,
    )
    print("\n".join(report))
    return 0


# --- train ------------------------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train",
        parents=[common],
        help="train a model on samples of a prepared dataset",
        description="Train CMRCNet (or the bleep / regression baselines) on training samples of a prepared "
        "dataset. Genes are chosen on the training samples only; validation spots are a seeded fraction of "
        "the training samples. Runs under torchrun for multi-GPU / multi-node training.",
    )
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    p.add_argument(
        "--train-samples", type=_id_list, required=True, help="comma-separated training sample ids"
    )
    p.add_argument("--out", type=Path, required=True, help="run folder (config, genes, checkpoints, metrics)")
    p.add_argument("--config", default="cpu", help="preset (paper, cpu, tiny) or YAML file (default cpu)")
    p.add_argument("--method", choices=["cmrcnet", "bleep", "regression"], help="training objective")
    p.add_argument("--epochs", type=_positive_int, help="number of epochs")
    p.add_argument("--batch-size", type=_positive_int, help="spots per optimiser step")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--precision", choices=PRECISION_CHOICES, help=PRECISION_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--genes", choices=["strict", "paper"], help="gene selection protocol (default strict)")
    p.add_argument("--n-genes", type=_positive_int, help="number of highly variable genes (strict mode)")
    p.add_argument(
        "--include-genes",
        help="genes always added to the model's genes (comma-separated or a file), e.g. markers",
    )
    p.add_argument(
        "--no-tumour-markers",
        action="store_true",
        help="do not add the tumour marker panel (ERBB2, GRB7, KRT8, KRT18, KRT19, EPCAM) to the genes",
    )
    p.add_argument(
        "--encoder",
        help="image encoder: an architecture (vit-cmrcnet, resnet50) or a folder written by `cmrcnet pretrain`",
    )
    p.add_argument(
        "--encoder-weights",
        type=Path,
        help="pretrained weights for --encoder (.safetensors or torch state dict)",
    )
    p.add_argument(
        "--freeze-encoder",
        action="store_true",
        help="keep the encoder fixed: its features are computed once (cached) and only the heads train",
    )
    p.add_argument(
        "--handcrafted", action="store_true", help="fuse colour/texture features into the image embedding"
    )
    p.add_argument("--feature-cache", type=Path, help="folder of the frozen-encoder feature cache")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from cmrcnet import api

    include = None
    if args.include_genes:
        from cmrcnet.data.markers import parse_markers

        include = parse_markers(args.include_genes) or []
    model = api.train(
        args.data,
        args.train_samples,
        args.out,
        config=args.config,
        device=args.device,
        resume=args.resume,
        progress=not args.quiet,
        command=" ".join(["cmrcnet", *sys.argv[1:]]),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        precision=args.precision,
        method=args.method,
        gene_mode=args.genes,
        n_genes=args.n_genes,
        include_genes=include,
        tumour_markers=False if args.no_tumour_markers else None,
        encoder=args.encoder,
        encoder_weights=args.encoder_weights,
        freeze_encoder=args.freeze_encoder,
        handcrafted=args.handcrafted,
        feature_cache=args.feature_cache,
    )
    result = model.training
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only the first process reports
        print(f"run folder: {result.run_dir}")
        print(f"best validation loss {result.best_val_loss:.4f} at epoch {result.best_epoch + 1}")
    return 0


# --- pretrain ---------------------------------------------------------------------------------------------
def _add_pretrain(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "pretrain",
        parents=[common],
        help="self-supervised pretraining of the image encoder on unlabelled H&E slides",
        description="Sample tissue tiles (random positions and rotations, the model's field of view) from any "
        "H&E slides, sequenced or not, and pretrain the image encoder with SimCLR. The folder it writes is "
        "the argument of `cmrcnet train --encoder`. Test slides are left out unless --include-test-slides "
        "(transductive; recorded in the encoder and in every run trained from it).",
    )
    p.add_argument("--slides", type=Path, nargs="+", required=True, help="H&E images (WSI, TIFF, JPEG, PNG)")
    p.add_argument(
        "--pixel-size",
        type=_positive_float,
        nargs="+",
        help="micrometres per pixel: one value for all slides or one per slide (default: slide metadata)",
    )
    p.add_argument("--test-slides", type=Path, nargs="+", default=[], help="slides of held-out test samples")
    p.add_argument(
        "--include-test-slides",
        action="store_true",
        help="also pretrain on --test-slides (transductive: results must say so)",
    )
    p.add_argument("--out", type=Path, required=True, help="encoder folder ENCODER_DIR (must not exist yet)")
    p.add_argument("--config", default="cpu", help="encoder preset (paper, cpu, tiny; default cpu)")
    p.add_argument("--image-encoder", default="vit-cmrcnet", help="architecture (default vit-cmrcnet)")
    p.add_argument("--tiles", type=_positive_int, help="tissue tiles to sample (default 4000)")
    p.add_argument("--epochs", type=_positive_int, help="passes over the tiles (default 8)")
    p.add_argument("--batch-size", type=_positive_int, help="tiles per step (default 64)")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate (default 5e-4)")
    p.add_argument("--fov-um", type=_positive_float, help="tile side in micrometres (default 112)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, help=PRECISION_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.set_defaults(handler=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from cmrcnet.training.pretrain import PretrainConfig, SlideSource, pretrain_encoder

    cfg = PretrainConfig(encoder=args.config, image_encoder=args.image_encoder)
    for name, value in {
        "n_tiles": args.tiles,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "fov_um": args.fov_um,
        "seed": args.seed,
        "precision": args.precision,
    }.items():
        if value is not None:
            setattr(cfg, name, value)
    paths = [*args.slides, *args.test_slides]
    sizes = args.pixel_size or [None]
    if len(sizes) not in (1, len(paths)):
        raise ConfigError(f"--pixel-size takes one value or one per slide ({len(paths)}), got {len(sizes)}")
    if len(sizes) == 1:
        sizes = sizes * len(paths)
    for path in paths:
        if not path.is_file():
            raise InputFileError("slide not found", path=path)
    sources = [
        SlideSource(path, um, test=i >= len(args.slides))
        for i, (path, um) in enumerate(zip(paths, sizes, strict=True))
    ]
    result = pretrain_encoder(
        sources,
        args.out,
        cfg,
        include_test_slides=args.include_test_slides,
        device=args.device,
        progress=not args.quiet,
        command=" ".join(["cmrcnet", *sys.argv[1:]]),
    )
    print(f"encoder folder: {result.out_dir}")
    print(
        f"{result.n_tiles} tiles, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, {result.seconds:.0f} s"
    )
    return 0


# --- bank -------------------------------------------------------------------------------------------------
def _add_bank(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bank",
        parents=[common],
        help="build or extend a run's reference bank of measured spots",
        description="The reference bank holds expression embeddings of measured spots; prediction retrieves "
        "the most similar ones. `build` replaces it with the given samples, `add` adds samples (replacing "
        "earlier versions of the same samples). Samples without an image (expression only) are welcome.",
    )
    p.add_argument("action", choices=["build", "add"], help="build: start from scratch; add: extend")
    p.add_argument("--model", type=Path, required=True, help="run folder of a trained model")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    p.add_argument("--samples", type=_id_list, required=True, help="comma-separated sample ids")
    p.add_argument("--allow-missing-genes", action="store_true", help="fill genes a sample lacks with zeros")
    p.set_defaults(handler=_run_bank)


def _run_bank(args: argparse.Namespace) -> int:
    from cmrcnet.data.dataset import PreparedDataset
    from cmrcnet.inference.bank import build_bank, load_bank, merge_banks, save_bank
    from cmrcnet.run.load import load_trained_model

    trained = load_trained_model(args.model)
    new = build_bank(
        trained,
        PreparedDataset(args.data),
        args.samples,
        allow_missing_genes=args.allow_missing_genes,
        progress=not args.quiet,
    )
    bank = merge_banks(load_bank(args.model, trained), new) if args.action == "add" else new
    path = save_bank(bank, args.model)
    print(f"reference bank {path}: {len(bank)} spots from samples {bank.samples}")
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
    p.add_argument("--model", type=Path, required=True, help="run folder of a trained model")
    p.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    p.add_argument("--samples", type=_id_list, required=True, help="comma-separated sample ids")
    p.add_argument("--out", type=Path, required=True, help="output .h5ad (spots x genes)")
    p.add_argument("--k", type=_positive_int, help="neighbours to average (default from the run: 50)")
    p.add_argument("--weighting", choices=["mean", "similarity"], help="plain (paper) or similarity-weighted")
    p.add_argument("--backend", choices=["exact", "faiss"], default="exact", help="search backend")
    p.add_argument("--checkpoint", choices=["best.pt", "last.pt"], help="default: the run's `select` setting")
    p.add_argument("--ema", action="store_true", default=None, help="use the EMA weights")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="patches per forward pass")
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
    p.add_argument("--markers", help="comma-separated marker genes or a file with one gene per line")
    p.add_argument("--protocol", choices=["strict", "paper"], default="strict", help="gene-set protocol")
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
    p.add_argument("--markers", help="comma-separated marker genes or a file with one gene per line")
    p.add_argument("--protocol", choices=["strict", "paper"], default="strict", help="gene-set protocol")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, help=PRECISION_HELP + "; overrides the config")
    p.add_argument("--plots", action="store_true", help="draw expression maps for every fold (slow)")
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
        command=" ".join(["cmrcnet", *sys.argv[1:]]),
    )
    print((result.out_dir / SUMMARY_MD).read_text(encoding="utf-8"))
    return 0


# --- predict-slide and predict-slides ----------------------------------------------------------------------
SLIDE_OUTPUTS = (
    "prediction.h5ad, tissue_mask.png, thumbnail.png, heatmap_<gene>.png, tumour_score.png (tumour_mask.png with "
    "--threshold), tiles.geojson (QuPath: File > Import objects) and summary.json"
)


def _add_slide_options(p: argparse.ArgumentParser, *, pixel_size_help: str) -> None:
    """The prediction options shared by predict-slide and predict-slides."""
    p.add_argument("--model", type=Path, required=True, help="run folder of a trained model")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--pixel-size", type=_positive_float, help=pixel_size_help)
    p.add_argument(
        "--step-um",
        type=_positive_float,
        help="grid step in um (default: the model's field of view; smaller overlaps tiles for smoother maps)",
    )
    p.add_argument(
        "--genes", type=_id_list, help="comma-separated genes to draw heatmaps of (default: markers)"
    )
    p.add_argument(
        "--markers",
        help="tumour-score marker genes: comma-separated or a file (default: breast tumour markers)",
    )
    p.add_argument("--threshold", type=float, help="tumour score at or above which a tile is called tumour")
    p.add_argument(
        "--min-tissue", type=float, default=0.5, help="fraction of a tile that must be tissue (default 0.5)"
    )
    p.add_argument("--k", type=_positive_int, help="neighbours to average (default from the run)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="tiles per forward pass (default 64)")
    _add_precision(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    from cmrcnet.data.slide_reader import READERS

    p.add_argument("--reader", choices=READERS, default="auto", help="slide back end")


def _slide_options(args: argparse.Namespace) -> dict:
    from cmrcnet.data.markers import parse_markers

    return dict(
        step_um=args.step_um,
        genes=args.genes,
        markers=parse_markers(args.markers),
        threshold=args.threshold,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        k=args.k,
        min_tissue=args.min_tissue,
        reader=args.reader,
    )


def _add_predict_slide(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "predict-slide",
        parents=[common],
        help="predict expression over a whole slide (tiles x genes, heatmaps, tumour score)",
        description="Detect tissue on a thumbnail, lay a regular grid of tiles of the model's field of view over "
        "the slide and predict every tissue tile, streaming tiles from the pyramid level nearest the resolution "
        f"the model needs (memory does not grow with the slide). Writes OUT_DIR/{SLIDE_OUTPUTS}. "
        'Vendor WSI formats (svs, ndpi, mrxs, ...) need OpenSlide: pip install "cmrcnet[slide]".',
    )
    p.add_argument("--slide", type=Path, required=True, help="WSI, OME/plain TIFF, JPEG or PNG")
    _add_slide_options(
        p,
        pixel_size_help="micrometres per full-resolution pixel (default: the slide's metadata; required without)",
    )
    p.add_argument(
        "--sample-id", help="slide id (default: the file name); bank spots of this id are excluded"
    )
    p.set_defaults(handler=_run_predict_slide)


def _run_predict_slide(args: argparse.Namespace) -> int:
    from cmrcnet import api
    from cmrcnet.inference.slide import SUMMARY_FILE

    adata = api.predict_slide(
        args.model,
        args.slide,
        args.out,
        pixel_size_um=args.pixel_size,
        sample_id=args.sample_id,
        progress=not args.quiet,
        **_slide_options(args),
    )
    s = json.loads((args.out / SUMMARY_FILE).read_text(encoding="utf-8"))
    print(
        f"predicted {s['n_tissue_tiles']} tissue tiles (of {s['n_grid_tiles']}) x {adata.n_vars} genes "
        f"at level {s['level']} (downsample {s['level_downsample']:.2f}), {s['tiles_per_second']} tiles/s "
        f"-> {args.out}"
    )
    return 0


def _add_predict_slides(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "predict-slides",
        parents=[common],
        help="predict many slides from a manifest (resumable; --shard K/N and torchrun split it)",
        description="Predict every slide listed in a manifest CSV (header; columns slide, optional pixel_size "
        f"and sample_id) into OUT/<sample_id>/ ({SLIDE_OUTPUTS}), each folder written whole or not at all. A "
        "rerun skips slides whose slide content, model and options are unchanged. A broken slide is recorded "
        "and skipped; the exit code is 0, or 100 + the number of failed slides. OUT/summary.csv and "
        "summary.json list every slide. Row i belongs to shard i mod N: --shard K/N for job arrays, and under "
        "torchrun each process takes its RANK's share.",
    )
    p.add_argument(
        "--manifest", type=Path, required=True, help="CSV with columns slide[,pixel_size][,sample_id]"
    )
    _add_slide_options(
        p, pixel_size_help="micrometres per pixel for rows without pixel_size (default: the slide's metadata)"
    )
    p.add_argument("--shard", help="K/N: predict only rows i with i mod N == K (0 <= K < N)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG maps (predictions and GeoJSON only)")
    p.set_defaults(handler=_run_predict_slides)


def _run_predict_slides(args: argparse.Namespace) -> int:
    from cmrcnet.inference.batch import predict_slides

    result = predict_slides(
        args.manifest,
        args.model,
        args.out,
        shard=args.shard,
        progress=not args.quiet,
        pixel_size_um=args.pixel_size,
        plots=not args.no_plots,
        **_slide_options(args),
    )
    counts = {s: sum(r["status"] == s for r in result.rows) for s in ("done", "skipped", "failed")}
    print(
        f"{len(result.rows)} slides: {counts['done']} predicted, {counts['skipped']} already done, "
        f"{counts['failed']} failed -> {result.out_dir} (summary.csv)"
    )
    for r in result.rows:
        if r["status"] == "failed":
            print(f"failed: {r['sample_id']}: {r['error']}", file=sys.stderr)
    return result.exit_code


# --- localise-eval ----------------------------------------------------------------------------------------
def _add_localise_eval(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "localise-eval",
        parents=[common],
        help="AUROC / average precision of a tumour score against pathologist labels",
        description="Match each label point (TSV: x, y in full-resolution pixels, label; optional sample_id) to "
        "the nearest predicted tile/spot centre within half a tile, then report how well the score separates "
        "the --positive labels from the rest (AUROC with ties counted half; average precision).",
    )
    p.add_argument("--pred", type=Path, required=True, help="prediction .h5ad (predict-slide or predict)")
    p.add_argument("--labels", type=Path, required=True, help="label TSV with columns x, y, label")
    p.add_argument("--positive", nargs="+", required=True, help="label(s) counted as positive (tumour)")
    p.add_argument(
        "--score-key", default="tumour_score", help="obs column or gene to rank by (default tumour_score)"
    )
    p.add_argument("--markers", help="markers for a tumour score computed here when --pred has none")
    p.add_argument(
        "--max-distance", type=_positive_float, help="matching distance in px (default: half a tile)"
    )
    p.add_argument("--out", type=Path, help="also write the report to this JSON file")
    p.set_defaults(handler=_run_localise_eval)


def _run_localise_eval(args: argparse.Namespace) -> int:
    from cmrcnet.data.markers import parse_markers
    from cmrcnet.evaluation.localisation import localise_eval

    r = localise_eval(
        args.pred,
        args.labels,
        args.positive,
        score_key=args.score_key,
        markers=parse_markers(args.markers),
        max_distance_px=args.max_distance,
        out_path=args.out,
    )
    print(
        f"{r['score']}: AUROC {r['auroc']:.3f}, average precision {r['average_precision']:.3f} "
        f"(prevalence {r['prevalence']:.3f}); {r['n_positive']} positive / {r['n_negative']} negative label "
        f"points matched, {r['n_unmatched']} unmatched"
    )
    return 0


# --- main ---------------------------------------------------------------------------------------------------
SUBCOMMANDS = (
    _add_prepare,
    _add_pretrain,
    _add_train,
    _add_bank,
    _add_predict,
    _add_evaluate,
    _add_demo,
    _add_cv,
    _add_predict_slide,
    _add_predict_slides,
    _add_localise_eval,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cmrcnet",
        description="Predict spatially resolved gene expression from H&E histology (CMRCNet).",
    )
    parser.add_argument("--version", action="version", version=f"cmrcnet {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")
    common.add_argument("--verbose", action="store_true", help="debug logging")
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub, common)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("cmrcnet")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    root = logging.getLogger("cmrcnet")
    saved = (list(root.handlers), root.level, root.propagate)
    _configure_logging(args)
    try:
        return args.handler(args)
    except CmrcnetError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"cmrcnet {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cmrcnet {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:  # leave logging as we found it (matters when main() is called in-process, e.g. from tests)
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


if __name__ == "__main__":
    sys.exit(main())
