"""Exact resume: a run interrupted (KeyboardInterrupt in-process, SIGKILL from outside) and resumed from last.pt
ends with the same weights, optimiser state, metrics and best epoch as an uninterrupted run of the same seed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmrcnet.errors import CheckpointError
from cmrcnet.run.checkpoint import load_checkpoint
from cmrcnet.run.layout import BEST_CKPT, LAST_CKPT, RUN_FILE
from cmrcnet.training import trainer as trainer_module
from cmrcnet.training.trainer import TrainResult
from cmrcnet.workflows.train import train_run

from training_utils import (
    TRAIN_SAMPLES,
    assert_same_tensors,
    cli_env,
    interrupted_at_step,
    run_cli,
    temporary_files,
    without_timing,
)

EPOCHS = 6
STEPS_PER_EPOCH = 7  # 56 training spots (70 minus 14 for validation) in batches of 8
COMPARED = (
    "epoch",
    "step",
    "model",
    "ema",
    "optimizer",
    "best_val",
    "best_epoch",
    "model_config",
    "run_config",
)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_ds: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """The reference: EPOCHS epochs of the tiny preset, seed 0, in one go."""
    from cmrcnet.run.config import load_run_config

    cfg = load_run_config("tiny")
    cfg.train.epochs = EPOCHS
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = train_run(
        data_dir=synthetic_ds, train_samples=TRAIN_SAMPLES, run_dir=run_dir, config=cfg, progress=False
    )
    return run_dir, result


def _assert_same_run(reference: Path, resumed: Path) -> None:
    for name in (LAST_CKPT, BEST_CKPT):
        a, b = load_checkpoint(reference / name), load_checkpoint(resumed / name)
        for key in COMPARED:
            assert_same_tensors(a[key], b[key], f"{name}:{key}")
        assert without_timing(a["history"]) == without_timing(b["history"]), name
    ref_meta = json.loads((reference / RUN_FILE).read_text())
    meta = json.loads((resumed / RUN_FILE).read_text())
    assert meta["status"] == "complete"
    assert (meta["best_epoch"], meta["best_val_loss"]) == (ref_meta["best_epoch"], ref_meta["best_val_loss"])
    assert temporary_files(resumed) == []


def test_keyboard_interrupt_then_resume_is_exact(
    uninterrupted: tuple[Path, TrainResult],
    train_tiny,
    tiny_run_config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference, ref_result = uninterrupted
    run_dir = tmp_path / "run"
    # the 4th step of the 3rd epoch
    with interrupted_at_step(monkeypatch, 2 * STEPS_PER_EPOCH + 4), pytest.raises(KeyboardInterrupt):
        train_tiny(run_dir, tiny_run_config(epochs=EPOCHS))

    assert load_checkpoint(run_dir / LAST_CKPT)["epoch"] == 1  # epochs 1 and 2 finished
    assert json.loads((run_dir / RUN_FILE).read_text())["status"] == "training"
    assert temporary_files(run_dir) == []

    result = train_tiny(run_dir, tiny_run_config(epochs=EPOCHS), resume=True)
    _assert_same_run(reference, run_dir)
    assert without_timing(result.history) == without_timing(ref_result.history)
    assert result.best_epoch == ref_result.best_epoch


@pytest.mark.slow
def test_interrupt_between_the_two_checkpoint_writes(
    uninterrupted: tuple[Path, TrainResult],
    train_tiny,
    tiny_run_config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kill after one of best.pt / last.pt of an epoch is written but before the other: last.pt must never
    name a best epoch that best.pt does not hold, and the resumed run still ends like the uninterrupted one."""
    reference, ref_result = uninterrupted
    assert ref_result.history[0]["is_best"] and ref_result.history[1]["is_best"]  # 2 writes in each epoch
    run_dir = tmp_path / "run"
    calls = {"n": 0}
    save = trainer_module.save_checkpoint

    def interrupted_save(path, payload):
        calls["n"] += 1
        if calls["n"] == 4:  # the second checkpoint of epoch 2
            raise KeyboardInterrupt
        save(path, payload)

    monkeypatch.setattr(trainer_module, "save_checkpoint", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(run_dir, tiny_run_config(epochs=EPOCHS))
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)

    last, best = load_checkpoint(run_dir / LAST_CKPT), load_checkpoint(run_dir / BEST_CKPT)
    assert best["epoch"] >= last["best_epoch"]
    train_tiny(run_dir, tiny_run_config(epochs=EPOCHS), resume=True)
    _assert_same_run(reference, run_dir)


def test_resume_of_a_finished_run_changes_nothing_but_removes_temporaries(
    uninterrupted: tuple[Path, TrainResult], train_tiny, tiny_run_config
) -> None:
    reference, _ = uninterrupted
    last, best = (reference / LAST_CKPT).read_bytes(), (reference / BEST_CKPT).read_bytes()
    (reference / ".best.pt.k1ll3d.tmp.pt").write_bytes(b"half a checkpoint")  # as a SIGKILL mid-write leaves
    result = train_tiny(reference, tiny_run_config(epochs=EPOCHS), resume=True)
    assert (reference / LAST_CKPT).read_bytes() == last and (reference / BEST_CKPT).read_bytes() == best
    assert len(result.history) == EPOCHS
    assert temporary_files(reference) == []


def _load_if_present(path: Path) -> dict | None:
    """The checkpoint at `path`, or None while it does not exist yet; an existing one must always load."""
    if not path.exists():  # never deleted once written (atomic rename over it)
        return None
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        pytest.fail(f"a checkpoint that exists must always load: {exc}")


@pytest.mark.slow
def test_sigkill_mid_run_then_cli_resume_is_exact(
    uninterrupted: tuple[Path, TrainResult], synthetic_ds: Path, tmp_path: Path
) -> None:
    reference, _ = uninterrupted
    run_dir = tmp_path / "run"
    args = ["train", "--data", str(synthetic_ds), "--train-samples", ",".join(TRAIN_SAMPLES)]
    args += ["--out", str(run_dir), "--config", "tiny", "--epochs", str(EPOCHS), "--quiet"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmrcnet", *args],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        killed_after = None
        while time.monotonic() < deadline and proc.poll() is None:
            for name in (BEST_CKPT, LAST_CKPT):  # whenever they exist, they load
                ckpt = _load_if_present(run_dir / name)
                if name == LAST_CKPT and ckpt is not None and ckpt["epoch"] >= 1:
                    killed_after = ckpt["epoch"]
            if killed_after is not None:
                break
            time.sleep(0.02)
        running = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed_after is not None, f"last.pt never reached epoch 2 (exit {proc.returncode}):\n{output}"
    assert running, "the run finished before it could be killed; make the epochs longer"
    assert proc.returncode == -signal.SIGKILL

    last = load_checkpoint(run_dir / LAST_CKPT)
    assert 1 <= last["epoch"] < EPOCHS - 1  # killed mid-run, not after the last epoch
    assert load_checkpoint(run_dir / BEST_CKPT)["epoch"] >= last["best_epoch"]
    assert json.loads((run_dir / RUN_FILE).read_text())["status"] == "training"

    done = run_cli([*args, "--resume"], cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    _assert_same_run(reference, run_dir)
