"""Argument types and options shared by the command modules."""

from __future__ import annotations

import argparse

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


def _id_list(text: str) -> list[str]:
    ids = [t.strip() for t in text.split(",") if t.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("expected a comma-separated list of ids")
    return ids
