"""Command-line interface. The only module that parses arguments, configures logging and prints.

User errors (CmrcnetError) print one line naming the file and the problem and exit with code 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from cmrcnet import __version__
from cmrcnet.constants import DEFAULT_FOV_UM, DEFAULT_PATCH_PX
from cmrcnet.errors import CmrcnetError, ConfigError

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
    from cmrcnet.data.prepare import prepare_sample
    from cmrcnet.data.readers import read_sample

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
    sample = read_sample(args.format, **kwargs)
    summary = prepare_sample(
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
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from cmrcnet.demo import run_demo

    report = run_demo(args.out, seed=args.seed, n_slides=args.slides, progress=not args.quiet)
    print("\n".join(report))
    return 0


# --- main ---------------------------------------------------------------------------------------------------
SUBCOMMANDS = (_add_prepare, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmrcnet",
        description="Predict spatially resolved gene expression from H&E histology (CMRCNet).",
    )
    parser.add_argument("--version", action="version", version=f"cmrcnet {__version__}")
    common = argparse.ArgumentParser(add_help=False)
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


if __name__ == "__main__":
    sys.exit(main())
