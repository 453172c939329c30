"""Command-line interface: the only part that parses arguments, configures logging and prints. Each command
module (`data_commands`, `train_commands`, `predict_commands`, `slide_commands`) adds its subcommands and calls
the public API (`cmrcnet.api`).

User errors (CmrcnetError) print one line naming the file and the problem and exit with code 2; `--debug`
shows the traceback instead. The library names its Python parameters (``pixel_size_um=``); errors and log lines
name the command's flags instead (``--pixel-size``, `cmrcnet.cli._common.PARAM_TO_FLAG`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from cmrcnet import __version__
from cmrcnet.cli._common import FlagNamesFormatter, _Parser, error_line
from cmrcnet.cli.data_commands import _add_demo, _add_prepare
from cmrcnet.cli.encoder_commands import _add_encoders
from cmrcnet.cli.predict_commands import _add_bank, _add_cv, _add_evaluate, _add_predict
from cmrcnet.cli.slide_commands import _add_localise_eval, _add_predict_slide, _add_predict_slides
from cmrcnet.cli.train_commands import _add_pretrain, _add_train
from cmrcnet.errors import CmrcnetError

logger = logging.getLogger("cmrcnet")

Handler = Callable[[argparse.Namespace], int]


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
    _add_encoders,
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
    handler.setFormatter(FlagNamesFormatter("%(levelname)s %(name)s: %(message)s", args.command))
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
        print(f"cmrcnet {args.command}: error: {error_line(exc, args.command)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"cmrcnet {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:  # leave logging as we found it (matters when main() is called in-process, e.g. from tests)
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


if __name__ == "__main__":
    sys.exit(main())
