"""The commands prepare and demo: their arguments and the API calls they make."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmrcnet.cli._common import _add_precision, _positive_float, _positive_int
from cmrcnet.constants import DEFAULT_FOV_UM, DEFAULT_PATCH_PX, ST_FOV_UM
from cmrcnet.errors import ConfigError


# --- prepare ------------------------------------------------------------------------------------------------
def _add_prepare(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "prepare",
        parents=[common],
        help="add one sample (ST, Visium, HEST or AnnData) to a prepared dataset folder",
        description="Read one sample, cut fixed field-of-view patches around its spots and write it into "
        "DATASET_DIR (HEST-compatible layout: patches/<id>.h5, st/<id>.h5ad, metadata/<id>.json).",
    )
    from cmrcnet.data.readers import FORMATS

    p.add_argument("--format", required=True, choices=FORMATS, help="input format")
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
        help=f"physical side of each patch in um (default {ST_FOV_UM:g} for legacy ST, whose spots lie 200 um "
        f"apart; {DEFAULT_FOV_UM:g} otherwise)",
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
