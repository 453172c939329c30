"""Tests for cmrcnet.workflows.cv (`cmrcnet cv`) on a tiny SYNTHETIC dataset with the tiny config, 1 epoch."""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import pytest
import torch

from cmrcnet import cli
from cmrcnet.constants import DEFAULT_STAIN_NORMALISE
from cmrcnet.data.prepare import prepare_sample
from cmrcnet.data.synthetic import SyntheticConfig, make_synthetic_samples
from cmrcnet.errors import ConfigError
from cmrcnet.workflows import cv as cv_mod
from cmrcnet.workflows.cv import parse_methods, parse_seeds, plan_folds, run_cv

# synS1 -> synP1, synS2 -> synP2, synS3 -> synP1 (round-robin)
SYN = SyntheticConfig(n_slides=3, n_patients=2, n_rows=6, n_cols=6, n_genes=30)
LOSO_METHODS = ["cmrcnet", "bleep"]
# the tiny preset with narrow embeddings (its reconstruction stream dominates the test time otherwise) and one
# torch thread (two threads on a busy 2-core machine were 4x slower)
TEST_CONFIG = (
    "preset: tiny\nmodel: {proj_dim: 32, regression_hidden: 32}\ntrain: {epochs: 1, num_threads: 1}\n"
)


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    n = torch.get_num_threads()  # train_run sets the process-wide thread count from the config
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cv_config") / "test.yaml"
    path.write_text(TEST_CONFIG)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cv_data") / "dataset"
    for sample in make_synthetic_samples(SYN):
        prepare_sample(sample, root, patch_px=32, progress=False)
    return root


@pytest.fixture(scope="module")
def loso(data_dir: Path, config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished leave-one-sample-out cv with two methods (6 runs); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("cv_loso") / "cv"
    run_cv(
        data_dir,
        out,
        split="leave-one-sample-out",
        methods=",".join(LOSO_METHODS),
        config=config_file,
        progress=False,
    )
    return out


def _mtimes(root: Path, name: str) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob(name)}


def test_parse_options() -> None:
    assert parse_methods("cmrcnet, bleep,cmrcnet") == ["cmrcnet", "bleep"]
    assert parse_seeds("2,0,2") == [2, 0]
    with pytest.raises(ConfigError, match="unknown method"):
        parse_methods("cmrcnet,hist2st")
    with pytest.raises(ConfigError, match="integers"):
        parse_seeds("0,x")


def test_loso_two_methods_summary(loso: Path) -> None:
    folds = json.loads((loso / "folds.json").read_text())
    assert folds["split"] == "leave-one-sample-out" and folds["split_seed"] == 0
    assert folds["samples"] == ["synS1", "synS2", "synS3"]  # default: every sample with an image
    assert {f["name"]: f["shared_patients"] for f in folds["folds"]} == {
        "synS1": ["synP1"],
        "synS2": [],
        "synS3": ["synP1"],
    }
    for method in LOSO_METHODS:
        for fold in ("synS1", "synS2", "synS3"):
            run = loso / method / "seed0" / fold
            assert (run / "run" / "last.pt").is_file() and (run / "pred.h5ad").is_file()
            metrics = json.loads((run / "eval" / "metrics.json").read_text())
            assert metrics["protocol_id"] == "strict" and metrics["test_samples"] == [fold]
            assert fold not in metrics["prediction"]["train_samples"]
            stain = ad.read_h5ad(run / "pred.h5ad").uns["cmrcnet"]["stain_normalisation"]
            assert (stain != "none") == DEFAULT_STAIN_NORMALISE  # predict's default

    summary = json.loads((loso / "summary.json").read_text())
    assert summary["methods"] == LOSO_METHODS and summary["protocol"] == "strict protocol"
    assert summary["synthetic"] is True and summary["std_ddof"] == 1
    for method in LOSO_METHODS:
        stats = summary["metrics"][method]
        assert stats["n_runs"] == 3
        for key in ("pcc_heg50", "pcc_hvg50", "pcc_markers", "pcc_all", "mse", "mae", "spotwise_pcc"):
            assert set(stats[key]) == {"mean", "std", "n"}
        # std over all fold x seed runs (ddof=1) of the per-fold values
        values = [r["values"]["mse"] for r in summary["runs"] if r["method"] == method]
        assert stats["mse"]["n"] == 3
        assert stats["mse"]["mean"] == pytest.approx(statistics.mean(values))
        assert stats["mse"]["std"] == pytest.approx(statistics.stdev(values))
        assert set(summary["per_fold"][method]) == {"synS1", "synS2", "synS3"}

    md = (loso / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert "cmrcnet" in header and "bleep" in header  # methods side by side
    for text in ("strict protocol", "SYNTHETIC", "leave-one-sample-out", "section-level split", "PCC HEG-50"):
        assert text in md
    assert "Wall time" in md and "Command" in md


def test_lopo_via_cli_keeps_patients_apart(
    data_dir: Path, config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cv"
    argv = ["cv", "--data", str(data_dir), "--split", "leave-one-patient-out", "--out", str(out)]
    argv += ["--method", "regression", "--config", str(config_file), "--epochs", "1", "--quiet", "--smooth", "0.25"]
    argv += ["--no-stain-normalise"]
    assert cli.main(argv) == 0
    preds = sorted(out.glob("**/pred.h5ad"))
    assert len(preds) == 2  # --smooth and --no-stain-normalise reach every fold's prediction
    assert all(ad.read_h5ad(p).uns["cmrcnet"]["smoothing_weight"] == 0.25 for p in preds)
    assert all(ad.read_h5ad(p).uns["cmrcnet"]["stain_normalisation"] == "none" for p in preds)
    assert "cmrcnet cross-validation" in capsys.readouterr().out
    folds = json.loads((out / "folds.json").read_text())
    assert folds["grouping"].startswith("by patient")
    patients = folds["patients"]
    assert len(folds["folds"]) == 2
    tested = []
    for fold in folds["folds"]:
        test_p = {patients[s] for s in fold["test"]}
        train_p = {patients[s] for s in fold["train"]}
        assert not test_p & train_p and fold["shared_patients"] == []
        tested += fold["test"]
    assert sorted(tested) == ["synS1", "synS2", "synS3"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["notes"] == [] and summary["metrics"]["regression"]["n_runs"] == 2
    assert "section-level" not in (out / "summary.md").read_text()


def test_resume_redoes_only_unfinished_folds(
    loso: Path, data_dir: Path, config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cv"
    shutil.copytree(loso, out)  # copy2 keeps the mtimes
    # (a) finished training, evaluation lost: predict + evaluate again, no training
    redo_eval = out / "cmrcnet" / "seed0" / "synS2"
    (redo_eval / "eval" / "metrics.json").unlink()
    (redo_eval / "pred.h5ad").unlink()
    # (b) interrupted after the last epoch, before the bank: train_run(resume=True) from last.pt
    resumed = out / "bleep" / "seed0" / "synS1"
    (resumed / "eval" / "metrics.json").unlink()
    info = json.loads((resumed / "run" / "run.json").read_text())
    (resumed / "run" / "run.json").write_text(json.dumps({**info, "status": "training"}))
    # (c) run folder without config.yaml: trained from scratch
    fresh = out / "bleep" / "seed0" / "synS3"
    (fresh / "eval" / "metrics.json").unlink()
    shutil.rmtree(fresh / "run")
    (fresh / "run").mkdir()
    before_ckpt = _mtimes(out, "last.pt")
    before_metrics = _mtimes(out, "metrics.json")

    calls: list[tuple[str, bool]] = []
    real_train_run = cv_mod.train_run

    def spy(**kwargs):
        calls.append((str(Path(kwargs["run_dir"]).relative_to(out)), kwargs["resume"]))
        return real_train_run(**kwargs)

    monkeypatch.setattr(cv_mod, "train_run", spy)
    options = dict(split="leave-one-sample-out", methods=LOSO_METHODS, config=config_file, progress=False)
    result = run_cv(data_dir, out, **options)
    assert sorted(calls) == [("bleep/seed0/synS1/run", True), ("bleep/seed0/synS3/run", False)]
    assert (result.n_computed, result.n_reused) == (3, 3)
    after_ckpt = _mtimes(out, "last.pt")
    changed = {k for k in before_ckpt if after_ckpt.get(k) != before_ckpt[k]}
    assert changed == set()  # no finished training rewritten, the resumed one had no epoch left
    assert "bleep/seed0/synS3/run/last.pt" in after_ckpt  # the fresh run was trained
    after_metrics = _mtimes(out, "metrics.json")
    for key, mtime in before_metrics.items():
        assert after_metrics[key] == mtime  # finished folds untouched
    for run in (redo_eval, resumed, fresh):
        assert (run / "eval" / "metrics.json").is_file()
    assert json.loads((resumed / "run" / "run.json").read_text())["status"] == "complete"
    assert json.loads((out / "summary.json").read_text())["metrics"]["bleep"]["n_runs"] == 3

    # everything finished: only the summary is rebuilt
    calls.clear()
    result = run_cv(data_dir, out, **options)
    assert calls == [] and (result.n_computed, result.n_reused) == (0, 6)
    # a different configuration in the same CV_DIR is refused before anything runs
    with pytest.raises(ConfigError, match="different configuration"):
        run_cv(data_dir, out, **{**options, "epochs": 2})
    with pytest.raises(ConfigError, match="different cross-validation"):
        run_cv(data_dir, out, **{**options, "samples": ["synS1", "synS2"]})


def test_plan_kfold_groups_patients(data_dir: Path) -> None:
    plan = plan_folds(data_dir, split="kfold", k=2, split_seed=3)
    assert plan["k"] == 2 and plan["split_seed"] == 3
    for fold in plan["folds"]:
        assert not {plan["patients"][s] for s in fold["test"]} & {plan["patients"][s] for s in fold["train"]}


def test_cli_user_errors_exit_2(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["cv", "--data", str(data_dir), "--out", str(tmp_path / "cv"), "--config", "tiny", "--quiet"]
    assert cli.main([*base, "--split", "leave-one-sample-out", "--samples", "synS1,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main([*base, "--split", "kfold", "--k", "3"]) == 2
    assert "kfold needs 2 <= k <= number of patients" in capsys.readouterr().err
    assert cli.main([*base, "--split", "leave-one-sample-out", "--method", "cmrcnet,foo"]) == 2
    assert "unknown method" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main([*base, "--split", "leave-one-slide-out"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "cv").exists()  # nothing started
