"""Plain helpers shared by the training tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

TRAIN_SAMPLES = ["synS1", "synS2"]  # synthetic slides with images (35 spots each)
EXPRESSION_ONLY = "synS3"  # the third synthetic slide, prepared without its image
REPO_ROOT = Path(__file__).resolve().parents[2]
TIMING_COLUMNS = ("seconds", "spots_per_s")  # metrics that depend on the machine, not on the seed


def cli_env() -> dict[str, str]:
    """Environment for `python -m cmrcnet ...` children: one thread each, this source tree importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def run_cli(args: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run `python -m cmrcnet ARGS` to the end (output captured, never raises on a non-zero exit)."""
    return subprocess.run(
        [sys.executable, "-m", "cmrcnet", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_same_tensors(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Nested dicts/lists of tensors and plain values are exactly equal (torch.equal on every tensor)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), (
            f"{where}: tensors differ (max abs diff {(a.double() - b.double()).abs().max()})"
        )
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def without_timing(history: list[dict]) -> list[dict]:
    """Metrics rows without the columns that measure the machine rather than the training."""
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in history]


def temporary_files(run_dir: Path) -> list[str]:
    """Names in `run_dir` that are left-over temporary files (atomic writes use hidden '.NAME.*' siblings)."""
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))


@contextmanager
def interrupted_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> Iterator[None]:
    """Training inside this block raises KeyboardInterrupt at its `step`-th training step (1-based), as Ctrl-C
    would; the trainer is restored on leaving the block."""
    from cmrcnet.training.trainer import Trainer

    forward = Trainer._forward
    calls = {"n": 0}

    def interrupted_forward(self, idx, gen):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return forward(self, idx, gen)

    monkeypatch.setattr(Trainer, "_forward", interrupted_forward)
    try:
        yield
    finally:
        monkeypatch.setattr(Trainer, "_forward", forward)
