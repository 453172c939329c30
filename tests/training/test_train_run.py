"""`train_run` end to end on a tiny SYNTHETIC dataset: artefacts, splits, genes, errors, determinism, learning."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.errors import ConfigError
from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.run.checkpoint import FORMAT, load_checkpoint
from cmrcnet.run.config import load_run_config
from cmrcnet.run.layout import (
    BANK_FILE,
    BEST_CKPT,
    CONFIDENCE_REFERENCE_FILE,
    CONFIG_FILE,
    CURVE_FILE,
    GENES_FILE,
    K_CHOICE_FILE,
    LAST_CKPT,
    METRICS_FILE,
    MODEL_FILE,
    NORMALIZATION_FILE,
    RUN_FILE,
    SPOTS_FILE,
    STAIN_REFERENCE_FILE,
)
from cmrcnet.training.trainer import TrainResult
from cmrcnet.workflows.train import train_run

from training_utils import (
    EXPRESSION_ONLY,
    TRAIN_SAMPLES,
    assert_same_tensors,
    temporary_files,
    without_timing,
)

EPOCHS = 4
RUN_FILES = {
    CONFIG_FILE,
    MODEL_FILE,
    GENES_FILE,
    NORMALIZATION_FILE,
    SPOTS_FILE,
    METRICS_FILE,
    CURVE_FILE,
    BEST_CKPT,
    LAST_CKPT,
    RUN_FILE,
    BANK_FILE,
    CONFIDENCE_REFERENCE_FILE,  # retrieval similarity of the validation spots, written with the bank
    STAIN_REFERENCE_FILE,  # colour statistics of the training patches (predict --stain-normalise)
    K_CHOICE_FILE,  # the retrieval k chosen for the bank (retrieval.k: auto)
}


@pytest.fixture(scope="module")
def trained(synthetic_ds: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """One tiny run of EPOCHS epochs (seed 0) shared by the read-only tests of this module."""
    cfg = load_run_config("tiny")
    cfg.train.epochs = EPOCHS
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = train_run(
        data_dir=synthetic_ds, train_samples=TRAIN_SAMPLES, run_dir=run_dir, config=cfg, progress=False
    )
    return run_dir, result


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / METRICS_FILE, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_run_writes_every_artefact(trained: tuple[Path, TrainResult]) -> None:
    run_dir, result = trained
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES  # nothing missing, nothing extra, no temp files

    cfg = load_run_config(run_dir / CONFIG_FILE)
    assert cfg.train.epochs == EPOCHS and cfg.encoder == "tiny" and cfg.train.precision == "fp32"
    last = load_checkpoint(run_dir / LAST_CKPT)
    assert _json(run_dir / MODEL_FILE) == last["model_config"]
    assert last["run_config"] == cfg.to_dict()
    assert _json(run_dir / NORMALIZATION_FILE)["target_sum"] == cfg.genes.target_sum
    assert (run_dir / CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = _metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))  # one row per epoch
    for key in ("train_loss", "val_loss", "val_loss_ema", "lr"):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in rows), key
    val = [float(r["val_loss"]) for r in rows]
    best = min(range(EPOCHS), key=val.__getitem__)
    assert result.best_epoch == best and result.best_val_loss == pytest.approx(val[best])

    meta = _json(run_dir / RUN_FILE)
    assert meta["status"] == "complete"
    assert meta["best_epoch"] == best + 1 and meta["train_samples"] == TRAIN_SAMPLES
    assert load_checkpoint(run_dir / BEST_CKPT)["epoch"] == best
    assert last["epoch"] == EPOCHS - 1 and len(last["history"]) == EPOCHS
    assert load_checkpoint(run_dir / BANK_FILE)  # a cmrcnet checkpoint too


def test_validation_spots_are_a_fifth_of_each_training_sample(
    trained: tuple[Path, TrainResult], synthetic_ds: Path
) -> None:
    run_dir, _ = trained
    spots = _json(run_dir / SPOTS_FILE)
    assert set(spots) == {"train", "validation"}
    assert sorted(spots["train"]) == sorted(spots["validation"]) == sorted(TRAIN_SAMPLES)
    dataset = PreparedDataset(synthetic_ds)
    n_val = 0
    for sid in TRAIN_SAMPLES:
        everything = list(dataset.read_counts(sid).obs_names)
        train, val = spots["train"][sid], spots["validation"][sid]
        assert not set(train) & set(val)
        assert sorted(train + val) == sorted(everything)
        assert len(val) == round(0.2 * len(everything))
        n_val += len(val)
    meta = _json(run_dir / RUN_FILE)
    assert meta["n_val_spots"] == n_val and meta["n_train_spots"] == 70 - n_val


def test_genes_are_chosen_on_the_training_samples_only(trained: tuple[Path, TrainResult]) -> None:
    run_dir, _ = trained
    genes = _json(run_dir / GENES_FILE)
    assert genes["mode"] == "strict"
    assert genes["selected_on"] == TRAIN_SAMPLES  # not the expression-only synS3 that is also in the dataset
    assert len(genes["genes"]) == _json(run_dir / MODEL_FILE)["n_genes"]


def test_checkpoints_load_with_weights_only(trained: tuple[Path, TrainResult]) -> None:
    run_dir, _ = trained
    for name in (BEST_CKPT, LAST_CKPT, BANK_FILE):
        data = torch.load(run_dir / name, map_location="cpu", weights_only=True)
        assert data["format"] == FORMAT
    last = torch.load(run_dir / LAST_CKPT, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig.from_dict(last["model_config"]))
    model.load_state_dict(last["model"])  # strict: every key, every shape


def test_second_train_into_the_same_folder_needs_resume(
    trained: tuple[Path, TrainResult], train_tiny, tiny_run_config
) -> None:
    run_dir, _ = trained
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.suffix in (".yaml", ".json", ".csv")}
    with pytest.raises(ConfigError, match="already holds a run; pass resume=True"):
        train_tiny(run_dir, tiny_run_config(epochs=1))
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_expression_only_training_sample_is_refused(
    synthetic_ds: Path, tmp_path: Path, tiny_run_config
) -> None:
    with pytest.raises(ConfigError, match=rf"\['{EXPRESSION_ONLY}'\] are expression-only"):
        train_run(
            data_dir=synthetic_ds,
            train_samples=[TRAIN_SAMPLES[0], EXPRESSION_ONLY],
            run_dir=tmp_path / "run",
            config=tiny_run_config(),
            progress=False,
        )
    assert not (tmp_path / "run").exists()


def test_training_samples_of_different_fields_of_view_are_refused(
    synthetic_ds: Path, tmp_path: Path, tiny_run_config
) -> None:
    """One model reads tissue at one scale: training samples prepared with different fields of view are refused
    before anything is written, with the values and the parameter to prepare them with."""
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(synthetic_ds, ds)
    meta_path = ds / "metadata" / f"{TRAIN_SAMPLES[1]}.json"
    meta = json.loads(meta_path.read_text())
    fov = float(meta["fov_um"])
    meta_path.write_text(json.dumps({**meta, "fov_um": 2 * fov}))
    want = (rf"different fields of view \({TRAIN_SAMPLES[0]}: {fov:g} um, {TRAIN_SAMPLES[1]}: {2 * fov:g} um\); "
            "prepare them again with one fov_um=")
    with pytest.raises(ConfigError, match=want):
        train_run(data_dir=ds, train_samples=TRAIN_SAMPLES[:2], run_dir=tmp_path / "run", config=tiny_run_config(),
                  progress=False)
    assert not (tmp_path / "run").exists()
    from cmrcnet.data.dataset import same_fov  # the one tolerance train and predict share

    assert same_fov(fov, fov * (1 + 1e-9)) and not same_fov(fov, fov * (1 + 1e-4))


def test_same_seed_gives_identical_weights(
    trained: tuple[Path, TrainResult], train_tiny, tiny_run_config, tmp_path: Path
) -> None:
    run_dir, result = trained
    again = train_tiny(tmp_path / "again", tiny_run_config(epochs=EPOCHS))
    reference = load_checkpoint(run_dir / LAST_CKPT)
    repeat = load_checkpoint(tmp_path / "again" / LAST_CKPT)
    for key in ("model", "ema", "optimizer", "step", "best_epoch", "best_val"):
        assert_same_tensors(reference[key], repeat[key], key)
    assert without_timing(again.history) == without_timing(result.history)
    assert temporary_files(tmp_path / "again") == []


def test_other_seed_gives_other_weights(
    trained: tuple[Path, TrainResult], train_tiny, tiny_run_config, tmp_path: Path
) -> None:
    run_dir, result = trained
    other = train_tiny(tmp_path / "other", tiny_run_config(epochs=EPOCHS, seed=1))
    reference = load_checkpoint(run_dir / LAST_CKPT)["model"]
    weights = load_checkpoint(tmp_path / "other" / LAST_CKPT)["model"]
    assert weights.keys() == reference.keys()
    differ = [k for k, v in weights.items() if v.is_floating_point() and not torch.equal(v, reference[k])]
    assert len(differ) > len(weights) // 2  # initialisation, split, order and augmentation all move
    assert other.history[-1]["train_loss"] != result.history[-1]["train_loss"]


def _drop(history: list[dict], key: str) -> float:
    return history[0][key] - history[-1][key]


def test_loss_goes_down_on_synthetic_data(
    trained: tuple[Path, TrainResult], train_tiny, tiny_run_config, tmp_path: Path
) -> None:
    # margins: from the first to the last epoch the total training loss must fall by 0.3 (it falls by ~0.7
    # with lr 1e-4) and the validation loss (fixed batches, fixed masks) by 0.2 (~0.5)
    _, result = trained
    assert _drop(result.history, "train_loss") > 0.3
    assert _drop(result.history, "val_loss") > 0.2
    # the same check fails when the model cannot learn (learning rate ~0): the margins are not vacuous
    frozen = train_tiny(tmp_path / "frozen", tiny_run_config(epochs=EPOCHS, lr=1e-8, min_lr=0.0))
    assert _drop(frozen.history, "train_loss") < 0.3
    assert abs(_drop(frozen.history, "val_loss")) < 0.01


def test_run_json_records_the_precision_and_why(trained: tuple[Path, TrainResult]) -> None:
    run_dir, _ = trained
    assert _json(run_dir / RUN_FILE)["precision"] == {
        "requested": "fp32",
        "precision": "fp32",
        "reason": "requested",
        "probe": None,
    }


def test_auto_precision_is_resolved_recorded_and_kept_auto_in_the_config(
    synthetic_ds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cmrcnet import runtime

    speeds = {torch.float32: 161.0, torch.bfloat16: 1.0}  # a CPU without native bf16
    monkeypatch.setenv("CMRCNET_CACHE", str(tmp_path / "cache"))  # no probe of the real CPU on disk
    monkeypatch.setattr(runtime, "_PROBES", {})
    monkeypatch.setattr(runtime, "_measure_gemm", lambda dtype, **_: speeds[dtype])
    cfg = load_run_config("tiny")
    cfg.train.epochs, cfg.train.precision = 1, "auto"
    run_dir = tmp_path / "run"
    train_run(data_dir=synthetic_ds, train_samples=TRAIN_SAMPLES, run_dir=run_dir, config=cfg, progress=False)
    recorded = _json(run_dir / RUN_FILE)["precision"]
    assert recorded["requested"] == "auto" and recorded["precision"] == "fp32"
    assert recorded["reason"].startswith("bf16 GEMM 1.0 vs fp32 161.0 GFLOP/s")
    assert recorded["probe"]["bf16_speedup"] == pytest.approx(1 / 161, abs=1e-4)
    # the config says what was asked for, so the run resumed on another machine measures again
    assert load_run_config(run_dir / CONFIG_FILE).train.precision == "auto"


def test_jitter_flags_reach_the_saved_config_and_change_training(
    trained: tuple[Path, TrainResult], synthetic_ds: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--stain-jitter` / `--scale-jitter` are saved with the run, and the same seed then trains other weights
    (the augmented patches differ); the reference run has both off (the tiny preset's values)."""
    from cmrcnet.cli import main

    run_dir, _ = trained
    out = tmp_path / "jitter"
    args = ["train", "--data", str(synthetic_ds), "--train-samples", ",".join(TRAIN_SAMPLES), "--out", str(out),
            "--config", "tiny", "--epochs", str(EPOCHS), "--stain-jitter", "0.2", "--scale-jitter", "3", "--quiet"]
    assert main(args) == 0
    saved = load_run_config(out / CONFIG_FILE).train
    assert (saved.stain_jitter, saved.scale_jitter) == (0.2, 3.0)
    plain = load_run_config(run_dir / CONFIG_FILE).train
    assert (plain.stain_jitter, plain.scale_jitter) == (0.0, 1.0)
    reference, jittered = load_checkpoint(run_dir / LAST_CKPT)["model"], load_checkpoint(out / LAST_CKPT)["model"]
    assert any(v.is_floating_point() and not torch.equal(v, jittered[k]) for k, v in reference.items())
    bad = [*args[:6], str(tmp_path / "bad"), *args[7:-5], "--stain-jitter", "1.5", "--quiet"]
    assert main(bad) == 2  # out of range: a clear error, exit 2, nothing written
    assert "stain_jitter must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_stain_normalise_trains_on_normalised_sections(
    trained: tuple[Path, TrainResult], synthetic_ds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`--stain-normalise` and its `--stain-rule` are saved with the run; training, the choice of the retrieval
    k and the confidence reference all see each training sample mapped onto the run's stain reference by that
    rule, so the same seed trains other weights."""
    import numpy as np

    from cmrcnet.cli import main
    from cmrcnet.data import stain
    from cmrcnet.data.stain import lab_stats, load_stain_reference, slide_target
    from cmrcnet.inference import predict as predict_module

    calls: list[tuple[list[str], list[float], str]] = []
    real = stain.normalise_table

    def spy(table, target, **kw):
        ids = np.asarray(table.sample_ids)
        rows = {sid: torch.from_numpy(np.flatnonzero(ids == sid)) for sid in set(table.sample_ids)}
        before = {sid: lab_stats(table.images[r].numpy()) for sid, r in rows.items()}
        done = real(table, target, **kw)
        calls.append((sorted(set(table.sample_ids)), target.mean, kw.get("rule", stain.DEFAULT_STAIN_RULE)))
        for sid, r in rows.items():  # every sample now has the colours the rule maps it onto
            want = slide_target(before[sid], target, **kw)
            got = lab_stats(table.images[r].numpy())
            np.testing.assert_allclose(got.mean, want.mean, atol=3.0)
            np.testing.assert_allclose(got.std, want.std, rtol=0.2, atol=2.0)
        return done

    monkeypatch.setattr(stain, "normalise_table", spy)  # training (fit_run)
    monkeypatch.setattr(predict_module, "normalise_table", spy)  # k choice and confidence reference (as trained)
    run_dir, _ = trained
    out = tmp_path / "stain"
    args = ["train", "--data", str(synthetic_ds), "--train-samples", ",".join(TRAIN_SAMPLES), "--out", str(out),
            "--config", "tiny", "--epochs", str(EPOCHS), "--stain-normalise", "--stain-rule", "reinhard", "--quiet"]
    assert stain.DEFAULT_STAIN_RULE != "reinhard"  # the rule asked for, not the default, reaches every step
    assert main(args) == 0
    assert load_run_config(out / CONFIG_FILE).train.stain_normalise
    assert load_run_config(out / CONFIG_FILE).train.stain_rule == "reinhard"
    assert not load_run_config(run_dir / CONFIG_FILE).train.stain_normalise  # off unless asked (tiny preset)
    reference = load_stain_reference(out / STAIN_REFERENCE_FILE)
    # training, then the retrieval k's choice on the training spots, then the validation spots' reference
    assert [c[0] for c in calls] == [sorted(TRAIN_SAMPLES)] * 3
    assert all(c[1] == reference.mean for c in calls)
    assert [c[2] for c in calls] == ["reinhard"] * 3
    assert (out / CONFIDENCE_REFERENCE_FILE).is_file()
    plain, normalised = load_checkpoint(run_dir / LAST_CKPT)["model"], load_checkpoint(out / LAST_CKPT)["model"]
    assert any(v.is_floating_point() and not torch.equal(v, normalised[k]) for k, v in plain.items())
    # predicting with another rule than the run trained with says so
    from cmrcnet.inference.predict import predict_samples

    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        predict_samples(out, synthetic_ds, TRAIN_SAMPLES[:1], None, stain_normalise=True, progress=False)
    assert "trained on patches colour-normalised by the 'reinhard' rule" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cmrcnet"):
        predict_samples(out, synthetic_ds, TRAIN_SAMPLES[:1], None, stain_normalise=True, stain_rule="reinhard",
                        progress=False)
    assert "colour-normalised by" not in caplog.text
