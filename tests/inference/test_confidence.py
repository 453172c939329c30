"""Retrieval confidence: per-query similarity and spread, the run's reference, the slide warning, and the
measure of confidence against error."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.spots import load_spot_table
from cmrcnet.inference import slide as slide_module
from cmrcnet.inference.bank import load_bank
from cmrcnet.inference.confidence import (
    SIMILARITY_KEY,
    SPREAD_KEY,
    ConfidenceReference,
    confidence_provenance,
    error_correlation,
    load_confidence_reference,
    neighbour_confidence,
    spot_errors,
)
from cmrcnet.inference.confidence_reference import build_confidence_reference, validation_spots
from cmrcnet.inference.kchoice import resolve_k
from cmrcnet.inference.predict import (
    BankRetriever,
    embed_patches,
    predict_from_embeddings,
    predict_samples,
)
from cmrcnet.inference.retrieval import aggregate, make_index
from cmrcnet.run.layout import CONFIDENCE_REFERENCE_FILE
from cmrcnet.run.load import load_trained_model

from test_slide import _predict


# --- pure functions -----------------------------------------------------------------------------------------
def test_neighbour_confidence_by_hand() -> None:
    expr = np.array([[0.0, 2.0], [2.0, 2.0], [4.0, 8.0]], dtype=np.float32)  # (N=3, G=2)
    idx = np.array([[0, 1], [2, -1]])  # the second query has one neighbour (-1 = missing)
    sims = np.array([[0.9, 0.5], [0.2, 0.99]], dtype=np.float32)
    c = neighbour_confidence(idx, sims, expr)
    np.testing.assert_allclose(c.similarity, [0.7, 0.2], rtol=1e-6)
    # query 0: gene 0 values 0, 2 -> std 1; gene 1 values 2, 2 -> std 0; mean 0.5. Query 1: one neighbour -> 0
    np.testing.assert_allclose(c.spread, [0.5, 0.0], atol=1e-7)


def test_error_correlation_by_hand() -> None:
    rng = np.random.default_rng(0)
    true = rng.normal(size=(6, 20))
    noise = rng.normal(size=(6, 20))
    scale = np.arange(6)[:, None] * 0.5  # spot i gets noise of size 0.5 * i: errors increase with i
    pred = true + scale * noise
    similarity = np.linspace(0.9, 0.1, 6)  # ... while similarity decreases
    assert error_correlation(similarity, pred, true, error="mse") == pytest.approx(-1.0)
    assert error_correlation(similarity, pred, true) == pytest.approx(-1.0)
    assert error_correlation(similarity[::-1], pred, true, error="mse") == pytest.approx(1.0)
    # 1 - spot-wise PCC: a perfect spot has error 0, an anti-correlated one 2
    e = spot_errors(
        np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    )
    np.testing.assert_allclose(e, [0.0, 2.0])
    assert np.isnan(error_correlation(np.ones(6), pred, true))  # a constant similarity ranks nothing
    with pytest.raises(ValueError, match="unknown error"):
        spot_errors(pred, true, error="mae")


def test_regression_records_no_confidence() -> None:
    prov = confidence_provenance(None, None, k=50)
    assert prov["confidence"].startswith("none: the regression method")
    assert "confidence_reference" not in prov


# --- the reference written by training ----------------------------------------------------------------------
def test_training_writes_the_reference(run: Path) -> None:
    path = run / CONFIDENCE_REFERENCE_FILE
    assert path.is_file()
    data = json.loads(path.read_text())
    q = [data["quantiles"][p] for p in ("1", "5", "10", "25", "50")]
    assert all(-1.0 <= v <= 1.0 for v in q) and q == sorted(q)
    assert data["source"] == "other_samples"  # two training samples: each retrieves from the other
    n_val = sum(len(v) for v in validation_spots(run).values())
    assert data["n"] == n_val > 0
    ref = load_confidence_reference(run, fingerprint=load_trained_model(run).fingerprint)
    assert ref is not None and ref.low == pytest.approx(data["quantiles"]["5"])


def test_one_training_sample_uses_the_other_split(run: Path) -> None:
    trained = load_trained_model(run)
    bank = load_bank(run, trained)
    one = bank.select(np.array([k.startswith("synS1:") for k in bank.keys]))
    spots = {"synS1": validation_spots(run)["synS1"]}
    ref = build_confidence_reference(trained, one, PreparedDataset(run.parent / "ds"), spots)
    assert ref is not None and ref.source == "other_split" and ref.n == len(spots["synS1"])
    # the validation spots' own bank entries were left out: no spot retrieves itself
    assert ref.quantiles["50"] < 1.0 - 1e-6


def test_a_run_without_reference_still_predicts(run: Path, tmp_path: Path, caplog) -> None:
    assert load_confidence_reference(tmp_path) is None  # no file: None, and no warning
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    (old / CONFIDENCE_REFERENCE_FILE).unlink()
    with caplog.at_level(logging.INFO, logger="cmrcnet"):
        pred = predict_samples(old, run.parent / "ds", ["synS1"], None, progress=False)
    assert SIMILARITY_KEY in pred.obs and "confidence_reference" not in pred.uns["cmrcnet"]
    assert any("no confidence_reference.json" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "confidence" in r.getMessage()]


# --- spot predictions ---------------------------------------------------------------------------------------
def test_spot_predictions_carry_confidence_and_are_unchanged(run: Path, tmp_path: Path) -> None:
    ds = run.parent / "ds"
    pred = predict_samples(
        run, ds, ["synS1"], tmp_path / "p.h5ad", progress=False, smooth=0.0, stain_normalise=False
    )  # compared below with retrieval on the unnormalised patches
    sim = pred.obs[SIMILARITY_KEY].to_numpy()
    spread = pred.obs[SPREAD_KEY].to_numpy()
    assert np.isfinite(sim).all() and (sim >= -1.0).all() and (sim <= 1.0).all()
    assert np.isfinite(spread).all() and (spread >= 0).all()
    info = pred.uns["cmrcnet"]
    assert set(info["confidence_reference"]["quantiles"]) == {"1", "5", "10", "25", "50"}
    assert 0.0 <= info["fraction_below_reference_p5"] <= 1.0
    on_disk = ad.read_h5ad(tmp_path / "p.h5ad")
    np.testing.assert_array_equal(on_disk.obs[SIMILARITY_KEY].to_numpy(), sim)

    # the predictions are those of retrieval without confidence, bit for bit
    trained = load_trained_model(run)
    bank = load_bank(run, trained)
    table = load_spot_table(
        PreparedDataset(ds), ["synS1"], None, img_size=trained.model_config.img_size, target_sum=1e4,
        progress=False,
    )  # fmt: skip
    emb = embed_patches(trained, table.images)
    k, weighting = resolve_k(trained, bank), trained.run_config.retrieval.weighting  # the run's chosen k
    plain = predict_from_embeddings(emb, ["synS1"] * len(emb), bank, k=k, weighting=weighting)
    np.testing.assert_array_equal(np.asarray(pred.X), plain)
    retriever = BankRetriever(bank, k=k, weighting=weighting, exclude_sample="synS1")
    with_conf, conf = retriever.retrieve(emb)
    index = make_index("exact")
    index.add(retriever.bank.embeddings)
    sims, idx = index.search(emb, retriever.k)
    before = np.asarray(aggregate(idx, sims, retriever.expression, weighting=weighting), dtype=np.float32)
    np.testing.assert_array_equal(with_conf, before)
    np.testing.assert_array_equal(retriever.predict(emb), before)
    np.testing.assert_allclose(conf.similarity, sims.mean(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(conf.similarity, sim)
    assert torch.is_tensor(emb)


# --- slides -------------------------------------------------------------------------------------------------
def _reference(level: float) -> ConfidenceReference:
    return ConfidenceReference({p: level for p in ("1", "5", "10", "25", "50")}, 10, "other_samples", 3, "x")


@pytest.mark.parametrize("level, warned", [(1.0, True), (-1.0, False)])
def test_slide_warning_fires_only_when_tiles_are_unlike_the_bank(
    run: Path, slide_tif: Path, tmp_path: Path, monkeypatch, capsys, level: float, warned: bool
) -> None:
    monkeypatch.setattr(slide_module, "load_confidence_reference", lambda *a, **kw: _reference(level))
    out = tmp_path / "out"
    assert _predict(run, slide_tif, out, "--genes", "SYN_TUMOR1") == 0
    summary = json.loads((out / "summary.json").read_text())
    conf = summary["confidence"]
    assert conf["fraction_below_reference_p5"] == (1.0 if warned else 0.0)
    html = (out / "report.html").read_text()
    logged = (
        "WARNING" in (err := capsys.readouterr().err) and "unlike the training sections" in err
    )  # the CLI log
    if warned:
        assert len(summary["warnings"]) == 1 and "this slide looks unlike the training sections" in html
        assert logged
    else:
        assert summary["warnings"] == [] and "unlike the training sections" not in html and not logged
    assert "confidence.png" in summary["files"] and (out / "confidence.png").is_file()
    a = ad.read_h5ad(out / "prediction.h5ad")
    sim = a.obs[SIMILARITY_KEY].to_numpy()
    assert np.isfinite(sim).all() and (np.abs(sim) <= 1.0).all() and SPREAD_KEY in a.obs
    assert a.uns["cmrcnet"]["fraction_below_reference_p5"] == conf["fraction_below_reference_p5"]


@pytest.fixture(scope="module")
def slide_tif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_slide import draw_slide, write_pyramid

    path = tmp_path_factory.mktemp("conf_slides") / "disc.tif"
    write_pyramid(path, draw_slide())
    return path
