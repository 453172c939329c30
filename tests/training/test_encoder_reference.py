"""A frozen encoder loaded from a weights file is stored by reference: checkpoints omit its tensors and record the
file's path and SHA-256; loading (prediction, bank, resume) rebuilds it from the file, and refuses a missing or
changed file with one line. Checkpoints with the encoder inside (written before, or by runs that train it) load
as before."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from cmrcnet.cli import main
from cmrcnet.errors import InputFileError
from cmrcnet.inference.predict import predict_samples
from cmrcnet.models.encoders import build_image_encoder, file_sha256
from cmrcnet.run.checkpoint import load_checkpoint
from cmrcnet.run.config import RunConfig, load_run_config
from cmrcnet.run.layout import BEST_CKPT, LAST_CKPT, RUN_FILE
from cmrcnet.run.load import load_trained_model
from cmrcnet.training import trainer as trainer_module
from cmrcnet.workflows.train import train_run

from training_utils import TRAIN_SAMPLES, assert_same_tensors, interrupted_at_step, without_timing

STEPS_PER_EPOCH = 7  # 56 training spots in batches of 8
PREFIX = "image_encoder."


def _config(weights: Path) -> RunConfig:
    cfg = load_run_config("tiny")
    cfg.encoder_weights = str(weights)
    cfg.model["freeze_encoder"] = True
    cfg.validate()
    return cfg


def _train(ds: Path, run_dir: Path, weights: Path, *, resume: bool = False) -> None:
    train_run(
        data_dir=ds,
        train_samples=TRAIN_SAMPLES,
        run_dir=run_dir,
        config=_config(weights),
        resume=resume,
        progress=False,
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT's weights (seed 7) as a safetensors file, without one tensor (that one stays in checkpoints)."""
    import torch

    torch.manual_seed(7)
    cfg = load_run_config("tiny").model_config(n_genes=4)
    state = {k: v.contiguous() for k, v in build_image_encoder(cfg).state_dict().items()}
    state.pop(sorted(state)[-1])
    path = tmp_path_factory.mktemp("weights") / "encoder.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def runs(synthetic_ds: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a run storing the encoder by reference, the same run trained as before this change: encoder inline)."""
    root = tmp_path_factory.mktemp("encoder_reference")
    _train(synthetic_ds, root / "by_reference", weights)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "stores_encoder_by_reference", lambda mcfg, rcfg: False)
        _train(synthetic_ds, root / "inline", weights)
    return root / "by_reference", root / "inline"


@pytest.fixture
def restore_weights(weights: Path) -> Iterator[Path]:
    """The shared weights file, put back as it was after a test moved or altered it."""
    saved = weights.read_bytes()
    yield weights
    weights.write_bytes(saved)


def test_checkpoints_hold_no_encoder_tensors_but_its_reference(
    runs: tuple[Path, Path], weights: Path
) -> None:
    by_ref, inline = runs
    for name in (BEST_CKPT, LAST_CKPT):
        ckpt = load_checkpoint(by_ref / name)
        ref = ckpt["encoder_ref"]
        assert ref["file"] == str(weights.resolve()) and ref["sha256"] == file_sha256(weights)
        assert ref["source"] == "weights file" and ref["tensors"]
        for part in ("model", "ema"):
            kept = [k for k in ckpt[part] if k.startswith(PREFIX)]
            assert len(kept) == 1, kept  # only the tensor the file lacks (still at its initial value)
            assert kept[0] not in ref["tensors"]
        old = load_checkpoint(inline / name)
        assert old["encoder_ref"] is None
        assert set(old["model"]) == set(ckpt["model"]) | set(ref["tensors"])
        # the rest is the same training: identical heads and optimiser state
        for part in ("model", "ema"):
            assert_same_tensors(ckpt[part], {k: old[part][k] for k in ckpt[part]}, f"{name}:{part}")
        assert_same_tensors(ckpt["optimizer"], old["optimizer"], f"{name}:optimizer")
        assert (by_ref / name).stat().st_size < (inline / name).stat().st_size
    storage = json.loads((by_ref / RUN_FILE).read_text())["encoder_storage"]
    assert storage["stored"] == "reference" and storage["sha256"] == file_sha256(weights)
    assert storage["path"] == str(weights.resolve())
    assert json.loads((inline / RUN_FILE).read_text())["encoder_storage"] == {"stored": "inline"}


def test_predictions_equal_those_of_the_encoder_stored_inline(
    runs: tuple[Path, Path], synthetic_ds: Path
) -> None:
    by_ref, inline = runs
    a = predict_samples(by_ref, synthetic_ds, ["synS1"], None, progress=False, precision="fp32")
    b = predict_samples(inline, synthetic_ds, ["synS1"], None, progress=False, precision="fp32")
    np.testing.assert_array_equal(np.asarray(a.X), np.asarray(b.X))
    for use_ema in (False, True):
        ta, tb = load_trained_model(by_ref, use_ema=use_ema), load_trained_model(inline, use_ema=use_ema)
        assert_same_tensors(ta.model.state_dict(), tb.model.state_dict(), f"loaded model (ema: {use_ema})")


def test_missing_or_changed_weights_file_is_one_line(
    runs: tuple[Path, Path], synthetic_ds: Path, restore_weights: Path, tmp_path: Path, capsys
) -> None:
    by_ref, inline = runs
    moved = tmp_path / "moved.safetensors"
    shutil.move(restore_weights, moved)
    with pytest.raises(InputFileError, match="encoder weights not found") as info:
        load_trained_model(by_ref)
    assert str(restore_weights) in str(info.value) and "\n" not in str(info.value)
    load_trained_model(inline)  # a checkpoint with the encoder inside never needs the file
    args = ["predict", "--model", str(by_ref), "--data", str(synthetic_ds), "--samples", "synS1"]
    assert main([*args, "--out", str(tmp_path / "p.h5ad"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoder weights not found" in err[0] and str(restore_weights) in err[0]
    # the same bytes back in place load again; any other content is refused
    shutil.move(moved, restore_weights)
    load_trained_model(by_ref)
    restore_weights.write_bytes(restore_weights.read_bytes() + b" ")
    with pytest.raises(InputFileError, match="changed since training"):
        load_trained_model(by_ref)


def test_resume_rebuilds_the_encoder_and_ends_like_an_uninterrupted_run(
    runs: tuple[Path, Path],
    synthetic_ds: Path,
    restore_weights: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    by_ref, _ = runs
    run_dir = tmp_path / "run"
    # the 2nd step of the 2nd epoch
    with interrupted_at_step(monkeypatch, STEPS_PER_EPOCH + 2), pytest.raises(KeyboardInterrupt):
        _train(synthetic_ds, run_dir, restore_weights)
    assert load_checkpoint(run_dir / LAST_CKPT)["epoch"] == 0

    saved = restore_weights.read_bytes()
    restore_weights.unlink()
    with pytest.raises(InputFileError, match="encoder weights not found"):
        _train(synthetic_ds, run_dir, restore_weights, resume=True)
    restore_weights.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
    with pytest.raises(InputFileError, match="changed since training"):
        _train(synthetic_ds, run_dir, restore_weights, resume=True)
    restore_weights.write_bytes(saved)

    _train(synthetic_ds, run_dir, restore_weights, resume=True)
    for name in (LAST_CKPT, BEST_CKPT):
        a, b = load_checkpoint(by_ref / name), load_checkpoint(run_dir / name)
        for key in ("epoch", "step", "model", "ema", "optimizer", "best_epoch", "encoder_ref"):
            assert_same_tensors(a[key], b[key], f"{name}:{key}")
        assert without_timing(a["history"]) == without_timing(b["history"])


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen-random", "trained-from-file"])
def test_trained_or_randomly_initialised_encoders_stay_inline(
    synthetic_ds: Path, weights: Path, tmp_path: Path, frozen: bool
) -> None:
    cfg = load_run_config("tiny")
    cfg.train.epochs = 1
    cfg.model["freeze_encoder"] = frozen
    cfg.encoder_weights = "" if frozen else str(weights)  # frozen but random, or from the file but trained
    train_run(
        data_dir=synthetic_ds, train_samples=TRAIN_SAMPLES, run_dir=tmp_path / "r", config=cfg, progress=False
    )
    ckpt = load_checkpoint(tmp_path / "r" / LAST_CKPT)
    assert ckpt["encoder_ref"] is None and any(k.startswith(PREFIX) for k in ckpt["ema"])
    assert json.loads((tmp_path / "r" / RUN_FILE).read_text())["encoder_storage"] == {"stored": "inline"}
