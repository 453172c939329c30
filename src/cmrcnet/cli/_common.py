"""Argument types and options shared by the command modules."""

from __future__ import annotations

import argparse
import logging
import re

from cmrcnet.errors import CmrcnetError
from cmrcnet.runtime import PRECISION_CHOICES


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


def _add_k(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--k", type=_positive_int,
        help="neighbours to average (default: the run's, chosen when its bank was built; retrieval_k.json)",
    )  # fmt: skip


def _add_stain(p: argparse.ArgumentParser) -> None:
    from cmrcnet.constants import DEFAULT_STAIN_NORMALISE
    from cmrcnet.data.stain import COLOUR_CAST, DEFAULT_STAIN_RULE, STAIN_RULES

    p.add_argument(
        "--stain-normalise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="map each slide's colours onto the training patches' first (slide level; black background made "
        f"white), for slides from another scanner or lab (default: {'on' if DEFAULT_STAIN_NORMALISE else 'off'}"
        ", skipped for runs without a stain reference; measured in benchmarks/results/her2st_accuracy.md)",
    )
    p.add_argument(
        "--stain-rule",
        choices=STAIN_RULES,
        default=DEFAULT_STAIN_RULE,
        help="how --stain-normalise maps a slide: 'contrast' matches the spread of L*a*b*, keeps the slide's "
        f"lightness and corrects its mean colour only for a cast above {COLOUR_CAST:g} units; 'reinhard' matches "
        f"means and spreads (default: {DEFAULT_STAIN_RULE})",
    )


def _add_smooth(p: argparse.ArgumentParser, unit: str) -> None:
    from cmrcnet.constants import DEFAULT_SMOOTH

    p.add_argument(
        "--smooth", type=float, default=DEFAULT_SMOOTH, metavar="W",
        help=f"average each {unit}'s prediction with its neighbours' predictions, weight W of their mean (0-1; "
        f"default {DEFAULT_SMOOTH}: it raised HEG-50 and marker PCC on held-out patients, "
        "benchmarks/results/her2st_accuracy.md; 0: none)",
    )  # fmt: skip


def _id_list(text: str) -> list[str]:
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("expected a comma-separated list of ids")
    return ids


# Library messages name Python parameters as `name=` (e.g. "pass pixel_size_um=", "pass resume=True",
# "device='cuda' requested"); the CLI prints its flags instead. This table is the one place that knows which
# flag sets which parameter; COMMAND_PARAM_TO_FLAG holds the commands where a parameter has another flag.
PARAM_TO_FLAG: dict[str, str] = {
    "allow_missing_genes": "--allow-missing-genes",
    "config": "--config",
    "device": "--device",
    "encoder": "--encoder",
    "encoder_weights": "--encoder-weights",
    "epochs": "--epochs",
    "fov_um": "--fov-um",
    "include_genes": "--include-genes",
    "include_test_slides": "--include-test-slides",
    "markers": "--markers",
    "max_distance_px": "--max-distance",
    "out": "--out",
    "out_dir": "--out",
    "pixel_size_um": "--pixel-size",
    "protocol": "--protocol",
    "recon_weight": "--recon-weight",
    "resume": "--resume",
    "run_dir": "--model",  # the trained run a command reads
    "samples": "--samples",
    "seeds": "--seeds",
    "smooth": "--smooth",
    "stain_normalise": "--stain-normalise",
    "stain_rule": "--stain-rule",
}
COMMAND_PARAM_TO_FLAG: dict[str, dict[str, str]] = {"train": {"run_dir": "--out"}}  # the run it writes

# `name=` then: True (a switch: the flag alone), a quoted value, a bare value, or nothing
_PARAM_RE = re.compile(
    r"(?<![\w./\\-])(?P<name>" + "|".join(sorted(PARAM_TO_FLAG, key=len, reverse=True)) + r")="
    r"(?:(?P<true>True)\b|(?P<q>['\"])(?P<quoted>[^'\"]*)(?P=q)|(?P<bare>[^\s'\",;()\[\]]+))?"
)
_PLAIN_VALUE = re.compile(r"[\w.,:/+-]+")


def flag_names(message: str, command: str | None = None) -> str:
    """`message` with the library's parameter names (`name=VALUE`) replaced by `command`'s flags
    (`--flag VALUE`), e.g. "pass pixel_size_um=" -> "pass --pixel-size", "protocol='paper'" -> "--protocol paper"."""
    flags = {**PARAM_TO_FLAG, **COMMAND_PARAM_TO_FLAG.get(command or "", {})}

    def flag(m: re.Match[str]) -> str:
        name = flags[m["name"]]
        if m["quoted"] is not None:
            plain = _PLAIN_VALUE.fullmatch(m["quoted"])
            return f"{name} {m['quoted'] if plain else m['q'] + m['quoted'] + m['q']}"
        return f"{name} {m['bare']}" if m["bare"] else name

    return _PARAM_RE.sub(flag, message)


def error_line(exc: CmrcnetError, command: str | None) -> str:
    """A library error as the CLI prints it: its file, then its problem in `command`'s flags."""
    problem = flag_names(exc.problem, command)
    return problem if exc.path is None else f"{exc.path}: {problem}"


class FlagNamesFormatter(logging.Formatter):
    """Log lines with the library's parameter names replaced by `command`'s flags (`flag_names`)."""

    def __init__(self, fmt: str, command: str | None) -> None:
        super().__init__(fmt)
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        return flag_names(super().format(record), self.command)
