"""Distributed training on the CPU: torchrun, 2 processes, the gloo backend.

The global batch of 8 is split 4 + 4 and the contrastive loss gathers embeddings from both processes
(`gather_with_grad`), so the run learns like a single-process run of the same config; rank 0 alone validates and
writes the run folder. (The gathering loss itself is unit-tested in tests/models/test_contrastive_loss.py.)
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from cmrcnet.run.checkpoint import load_checkpoint
from cmrcnet.run.layout import BANK_FILE, BEST_CKPT, LAST_CKPT, METRICS_FILE, RUN_FILE

from training_utils import TRAIN_SAMPLES, cli_env

EPOCHS = 3


def _skip_without_gloo() -> None:
    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed (torchrun)")
    if not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend (needed for distributed training on the CPU)")
    if importlib.util.find_spec("torch.distributed.run") is None:
        pytest.skip("torch.distributed.run (torchrun) is not available")


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / METRICS_FILE, newline="", encoding="utf-8") as fh:
        return [
            {k: float(v) if k != "is_best" else v == "True" for k, v in r.items()} for r in csv.DictReader(fh)
        ]


@pytest.mark.slow
def test_torchrun_two_cpu_processes(synthetic_ds: Path, tmp_path: Path, train_tiny, tiny_run_config) -> None:
    _skip_without_gloo()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "cmrcnet", "train", "--data", str(synthetic_ds), "--train-samples", ",".join(TRAIN_SAMPLES)]
    cmd += ["--out", str(run_dir), "--config", "tiny", "--epochs", str(EPOCHS), "--batch-size", "8"]
    cmd += ["--quiet", "--verbose"]  # no progress bars, but the log names the process group
    try:
        done = subprocess.run(
            cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=180, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in 180 s:\n{exc.stderr}")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "process 0/2 joined the gloo group" in log and "process 1/2 joined the gloo group" in log
    assert log.count("2 process(es)") == 2  # both ranks trained

    # one run folder, written once by rank 0: no duplicates, no temporary files
    names = sorted(p.name for p in run_dir.iterdir())
    assert not [n for n in names if n.startswith(".")], names
    assert {BEST_CKPT, LAST_CKPT, BANK_FILE, METRICS_FILE, RUN_FILE} <= set(names)
    assert sorted(p.name for p in run_dir.glob("*.pt")) == sorted([BANK_FILE, BEST_CKPT, LAST_CKPT])
    assert not list(tmp_path.glob("*.pt")) and len(list(tmp_path.iterdir())) == 1  # nothing outside --out
    last = load_checkpoint(run_dir / LAST_CKPT)
    assert last["epoch"] == EPOCHS - 1 and last["run_config"]["train"]["batch_size"] == 8
    load_checkpoint(run_dir / BANK_FILE)
    assert json.loads((run_dir / RUN_FILE).read_text())["status"] == "complete"

    rows = _metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("train_loss", "val_loss", "val_loss_ema")), r
    # the same trajectory shape as one process on the same config: both fall from epoch 1 to epoch 3
    single = train_tiny(tmp_path / "single", tiny_run_config(epochs=EPOCHS, batch_size=8)).history
    for history in (rows, single):
        assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1
        assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.1
    # both processes agree on the validation result (rank 0 validates and shares it), so both report it
    assert "best validation loss inf" not in log and log.count("best validation loss") == 1  # rank 0 reports
