"""Reference bank and prediction on a tiny trained run (tiny preset, one epoch)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from inference_utils import bank_run

from cmrcnet.cli import main
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.errors import CheckpointError, ConfigError
from cmrcnet.inference.bank import load_bank
from cmrcnet.inference.predict import predict_from_embeddings, predict_samples
from cmrcnet.inference.retrieval import retrieve_expression
from cmrcnet.run.load import load_trained_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return bank_run(tmp_path_factory.mktemp("bankrun"))


def test_bank_holds_every_training_spot(trained: tuple[Path, Path]) -> None:
    _, run = trained
    tm = load_trained_model(run)
    bank = load_bank(run, tm)
    assert bank.samples == ["synS1", "synS2"]
    assert len(bank) == bank.embeddings.shape[0] == bank.expression.shape[0]
    assert {k.split(":")[0] for k in bank.keys} == {"synS1", "synS2"}
    assert bank.genes == tm.genes and torch.isfinite(bank.embeddings).all()


def test_bank_add_expression_only_sample(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ds, run = trained
    n_before = len(load_bank(run))
    assert (
        main(["bank", "add", "--model", str(run), "--data", str(ds), "--samples", "exprOnly", "--quiet"]) == 0
    )
    bank = load_bank(run)
    added = [k for k in bank.keys if k.startswith("exprOnly:")]
    assert bank.samples == ["synS1", "synS2", "exprOnly"] and len(bank) == n_before + len(added) and added
    # adding the same sample again replaces it instead of duplicating it
    assert (
        main(["bank", "add", "--model", str(run), "--data", str(ds), "--samples", "exprOnly", "--quiet"]) == 0
    )
    assert len(load_bank(run)) == len(bank)
    # predictions of synS3 now retrieve from the expression-only spots as well
    pred = predict_samples(run, ds, ["synS3"], tmp_path / "p.h5ad", progress=False)
    assert "exprOnly" in pred.uns["cmrcnet"]["bank_samples"]
    assert (
        main(["bank", "build", "--model", str(run), "--data", str(ds), "--samples", "synS1,synS2", "--quiet"])
        == 0
    )
    assert load_bank(run).samples == ["synS1", "synS2"]


def test_predict_writes_anndata_with_provenance(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ds, run = trained
    out = tmp_path / "pred.h5ad"
    rc = main(
        [
            "predict",
            "--model",
            str(run),
            "--data",
            str(ds),
            "--samples",
            "synS3",
            "--out",
            str(out),
            "--quiet",
            "--k",
            "5",
        ]
    )
    assert rc == 0
    a = ad.read_h5ad(out)
    tm = load_trained_model(run)
    n_spots = PreparedDataset(ds).read_counts("synS3").n_obs
    assert list(a.var_names) == tm.genes and a.n_obs == n_spots
    assert a.obsm["spatial"].shape == (a.n_obs, 2) and set(a.obs["sample_id"]) == {"synS3"}
    info = a.uns["cmrcnet"]
    assert (
        info["method"] == "cmrcnet" and info["k"] == 5 and list(info["train_samples"]) == ["synS1", "synS2"]
    )
    # the CLI default is auto: the precision used and the reason are recorded
    assert info["precision_requested"] == "auto" and info["precision"] in ("fp32", "bf16")
    assert "GFLOP/s on this CPU" in info["precision_reason"]
    assert np.isfinite(a.X).all() and (a.X >= 0).all()


def test_prediction_is_mean_of_retrieved_bank_profiles(trained: tuple[Path, Path]) -> None:
    _, run = trained
    bank = load_bank(run)
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal((4, bank.embeddings.shape[1])).astype(np.float32))
    got = predict_from_embeddings(q, ["other"] * 4, bank, k=3, weighting="mean")
    e = bank.embeddings.numpy() / np.linalg.norm(bank.embeddings.numpy(), axis=1, keepdims=True)
    qn = q.numpy() / np.linalg.norm(q.numpy(), axis=1, keepdims=True)
    top = np.argsort(-(qn @ e.T), axis=1)[:, :3]
    np.testing.assert_allclose(got, bank.expression.numpy()[top].mean(axis=1), rtol=1e-5, atol=1e-6)


def test_a_sample_never_retrieves_its_own_spots(trained: tuple[Path, Path]) -> None:
    _, run = trained
    bank = load_bank(run)
    own = np.array([k.startswith("synS1:") for k in bank.keys])
    q = bank.embeddings[torch.from_numpy(np.flatnonzero(own)[:3])]  # queries identical to synS1 bank entries
    got = predict_from_embeddings(q, ["synS1"] * 3, bank, k=2, weighting="mean")
    other = torch.from_numpy(np.flatnonzero(~own))
    expected = retrieve_expression(
        q.numpy(), bank.embeddings[other].numpy(), bank.expression[other].numpy(), k=2
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_bank_from_other_weights_is_refused(trained: tuple[Path, Path]) -> None:
    _, run = trained
    tm = load_trained_model(run, use_ema=True)  # a different set of weights than the bank was built with
    with pytest.raises(CheckpointError, match="rebuild"):
        load_bank(run, tm)


def test_the_runs_config_yaml_chooses_the_weights_that_predict(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """`train.select` and `train.use_ema` in the run's config.yaml, edited after training, choose the checkpoint and
    the weights (as when set before training); an explicit argument still wins; a non-boolean is refused."""
    import shutil

    import yaml

    from cmrcnet.errors import InputFileError

    _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["train"].update(select="last", use_ema=True)
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    tm = load_trained_model(copy)
    assert (tm.checkpoint, tm.weights) == ("last.pt", "ema")
    assert load_trained_model(copy, use_ema=False).weights == "model"
    cfg["train"]["use_ema"] = "yes"
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(InputFileError, match="use_ema must be true or false"):
        load_trained_model(copy)


def test_ema_weights_close_to_the_initial_ones_are_flagged(trained: tuple[Path, Path], caplog) -> None:
    """The fixture's run trained one epoch (a few steps): its EMA (decay 0.99) still holds most of the initial
    weights, which predict nearly constant expression; loading them says so, loading the raw weights does not."""
    _, run = trained
    with caplog.at_level("WARNING", logger="cmrcnet.run.load"):
        load_trained_model(run, use_ema=False)
        assert not [r for r in caplog.records if "EMA" in r.getMessage()]
        load_trained_model(run, use_ema=True)
    (msg,) = [r.getMessage() for r in caplog.records if "EMA" in r.getMessage()]
    assert "initial weights" in msg and "train.use_ema: false" in msg


def test_predicting_an_expression_only_sample_is_an_error(trained: tuple[Path, Path], tmp_path: Path) -> None:
    ds, run = trained
    with pytest.raises(ConfigError, match="no image"):
        predict_samples(run, ds, ["exprOnly"], tmp_path / "x.h5ad", progress=False)


def test_stain_target_recolours_the_test_patches_before_embedding(trained: tuple[Path, Path]) -> None:
    """predict_spots(stain_target=...) maps the test sample's colours onto the target: a target equal to the
    sample's own statistics changes the predictions hardly at all, a far-off target changes them."""
    from cmrcnet.data.spots import load_spot_table
    from cmrcnet.data.stain import LabStats, lab_stats
    from cmrcnet.inference.predict import predict_spots

    ds, run = trained
    model = load_trained_model(run)
    bank = load_bank(run, model)
    own = lab_stats(load_spot_table(PreparedDataset(ds), ["synS3"], None, img_size=32, target_sum=1e4,
                                    progress=False).images.numpy())
    plain = predict_spots(model, bank, ds, ["synS3"], progress=False, precision="fp32")
    same = predict_spots(model, bank, ds, ["synS3"], progress=False, precision="fp32", stain_target=own)
    far = predict_spots(model, bank, ds, ["synS3"], progress=False, precision="fp32",
                        stain_target=LabStats([own.mean[0] * 0.6, own.mean[1] + 30, own.mean[2] - 30], own.std, 1))
    assert np.abs(np.asarray(same.X) - np.asarray(plain.X)).mean() < np.abs(np.asarray(far.X) - np.asarray(plain.X)).mean()
    assert not np.allclose(np.asarray(far.X), np.asarray(plain.X))
    # a target that is only darker: the default "contrast" rule keeps the slide's lightness, "reinhard" does not
    darker = LabStats([own.mean[0] * 0.6, *own.mean[1:]], own.std, 1)
    kept = predict_spots(model, bank, ds, ["synS3"], progress=False, precision="fp32", stain_target=darker)
    moved = predict_spots(model, bank, ds, ["synS3"], progress=False, precision="fp32", stain_target=darker,
                          stain_rule="reinhard")
    np.testing.assert_array_equal(np.asarray(kept.X), np.asarray(same.X))
    assert not np.allclose(np.asarray(moved.X), np.asarray(same.X))
    assert "rule 'reinhard'" in moved.uns["cmrcnet"]["stain_normalisation"]


def test_smooth_averages_each_spot_with_its_neighbours(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from cmrcnet.inference.smoothing import smooth_neighbours

    ds, run = trained
    plain = predict_samples(run, ds, ["synS3"], None, progress=False, precision="fp32", smooth=0.0)
    assert plain.uns["cmrcnet"]["smoothing_weight"] == 0.0
    out = tmp_path / "smooth.h5ad"
    # no --smooth: the default weight 0.5
    assert main(["predict", "--model", str(run), "--data", str(ds), "--samples", "synS3", "--out", str(out),
                 "--precision", "fp32", "--quiet"]) == 0
    smooth = ad.read_h5ad(out)
    expected = smooth_neighbours(np.asarray(plain.X), np.asarray(plain.obsm["spatial"]), weight=0.5)
    np.testing.assert_allclose(np.asarray(smooth.X), expected, rtol=1e-5, atol=1e-6)
    assert smooth.uns["cmrcnet"]["smoothing_weight"] == 0.5
    assert main(["predict", "--model", str(run), "--data", str(ds), "--samples", "synS3", "--out",
                 str(tmp_path / "off.h5ad"), "--smooth", "0", "--precision", "fp32", "--quiet"]) == 0
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "off.h5ad").X, np.asarray(plain.X), rtol=1e-5, atol=1e-6)
    assert main(["predict", "--model", str(run), "--data", str(ds), "--samples", "synS3", "--out",
                 str(tmp_path / "bad.h5ad"), "--smooth", "2", "--quiet"]) == 2


def test_samples_prepared_with_another_field_of_view_are_refused(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A model reads tissue at the scale it trained on: patches of another field of view are an error that names
    the sample and the --fov-um to prepare it with, before any work; on the CLI exit 2, no traceback, no output."""
    import json

    from cmrcnet.inference.predict import predict_spots

    ds, run = trained
    tm = load_trained_model(run)
    fov = float(tm.run_info["fov_um"])
    assert PreparedDataset(ds).metadata("synS3")["fov_um"] == fov
    predict_spots(tm, load_bank(run, tm), ds, ["synS3"], None, progress=False)  # the same field of view: fine
    tm.run_info["fov_um"] = 2 * fov
    with pytest.raises(ConfigError, match=rf"synS3 \({fov:g} um\): prepared with another field of view .*"
                       rf"fov_um={2 * fov:g}"):
        predict_spots(tm, load_bank(run, tm), ds, ["synS3"], None, progress=False)
    info = json.loads((run / "run.json").read_text())
    other = tmp_path / "run"
    import shutil

    shutil.copytree(run, other)
    (other / "run.json").write_text(json.dumps({**info, "fov_um": 2 * fov}))
    out = tmp_path / "pred.h5ad"
    capsys.readouterr()
    assert main(["predict", "--model", str(other), "--data", str(ds), "--samples", "synS3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "prepared with another field of view" in err and f"--fov-um {2 * fov:g}" in err
    assert "Traceback" not in err and not out.exists()
