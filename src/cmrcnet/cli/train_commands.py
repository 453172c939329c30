"""The commands train and pretrain: their arguments and the API calls they make."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cmrcnet.cli._common import PRECISION_HELP, _id_list, _positive_float, _positive_int
from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.runtime import PRECISION_CHOICES


# --- train ------------------------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from cmrcnet.data.genes import GENE_MODES
    from cmrcnet.data.stain import DEFAULT_STAIN_RULE, STAIN_RULES
    from cmrcnet.models.config import METHODS

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
    p.add_argument("--method", choices=METHODS, help="training objective")
    p.add_argument("--epochs", type=_positive_int, help="number of epochs")
    p.add_argument("--batch-size", type=_positive_int, help="spots per optimiser step")
    p.add_argument("--lr", type=_positive_float, help="peak learning rate")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--precision", choices=PRECISION_CHOICES, help=PRECISION_HELP)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--stain-jitter", type=float, metavar="S",
        help="augmentation for other stains and scanners: each patch's optical density scaled per channel by "
        "a random factor in [1-S, 1+S] (0 turns it off; default: the preset's)",
    )
    p.add_argument(
        "--scale-jitter", type=float, metavar="F",
        help="augmentation for coarser scans: patches shrunk by a random factor up to F and resized back "
        "(1 turns it off; default: the preset's)",
    )
    p.add_argument(
        "--stain-normalise", action=argparse.BooleanOptionalAction, default=None,
        help="map each training sample's colours onto the training samples' pooled colour statistics before "
        "training (slide level, by --stain-rule), as prediction maps a new slide's (default: the preset's, off in all; it "
        "did worse on held-out patients, benchmarks/results/her2st_accuracy.md)",
    )
    p.add_argument(
        "--stain-rule", choices=STAIN_RULES,
        help="the rule of --stain-normalise, recorded in the run's config (default: the preset's, "
        f"{DEFAULT_STAIN_RULE}); pass the same to predict",
    )
    p.add_argument("--genes", choices=GENE_MODES, help="gene selection protocol (default strict)")
    p.add_argument("--n-genes", type=_positive_int, help="number of highly variable genes (strict mode)")
    p.add_argument("--n-expressed-genes", type=int, metavar="M",
                   help="highly expressed genes added to the panel (strict mode; default 100, 0 for none)")
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
        "--recon-weight",
        type=_positive_float,
        help="factor on the cross-modal reconstruction term of the cmrcnet loss (default: the preset's)",
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
        stain_jitter=args.stain_jitter,
        scale_jitter=args.scale_jitter,
        stain_normalise=args.stain_normalise,
        stain_rule=args.stain_rule,
        method=args.method,
        gene_mode=args.genes,
        n_genes=args.n_genes,
        n_expressed_genes=args.n_expressed_genes,
        include_genes=include,
        tumour_markers=False if args.no_tumour_markers else None,
        encoder=args.encoder,
        encoder_weights=args.encoder_weights,
        recon_weight=args.recon_weight,
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
