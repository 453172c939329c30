"""Tests for cmrcnet.evaluation.evaluate (and markers) on tiny prepared datasets and hand-written PRED.h5ad files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.genes import expression_matrix, normalized_dispersion
from cmrcnet.data.markers import (
    BREAST_CANCER_MARKERS,
    SYNTHETIC_MARKERS,
    default_markers,
    parse_markers,
)
from cmrcnet.data.prepare import prepare_sample
from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.evaluation import evaluate as evaluate_mod
from cmrcnet.evaluation.evaluate import evaluate_predictions
from cmrcnet.evaluation.metrics import evaluate_arrays, top_expressed_genes

from sample_factory import make_sample

TRAIN = ["tr1", "tr2"]
TEST = ["te1", "te2"]  # te2 has no image (no thumbnail)
TARGET_SUM = 1e4
N_TOP = 5
ZERO_GENE = "G005"  # all-zero counts on te1: constant in the measured data
FLAT_PRED_GENE = "G007"  # constant prediction on te1


def _prepare(root: Path, *, perturb_test: bool = False) -> Path:
    for i, sid in enumerate(TRAIN + TEST):
        sample = make_sample(sid, seed=i, patient_id=f"P{i}", image=sid != "te2")
        x = sample.counts.X.toarray()  # (N, G)
        if sid == "te1":
            x[:, int(ZERO_GENE[1:])] = 0.0
        if perturb_test and sid in TEST:
            rng = np.random.default_rng(100 + i)
            x = x[:, rng.permutation(x.shape[1])] * rng.uniform(0.05, 20.0, size=(1, x.shape[1]))
            x = np.round(x)
            x[:, 0] += 1  # no empty spot
            if sid == "te1":
                x[:, int(ZERO_GENE[1:])] = 0.0
        sample.counts.X = type(sample.counts.X)(x.astype(np.float32))
        prepare_sample(sample, root, fov_um=30.0, patch_px=16, progress=False)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(tmp_path_factory.mktemp("prepared"))


def _measured(root: Path, sid: str, genes: list[str], barcodes: list[str] | None = None) -> np.ndarray:
    counts = PreparedDataset(root).read_counts(sid)
    if barcodes is not None:
        counts = counts[barcodes]
    return expression_matrix(counts, genes, target_sum=TARGET_SUM, allow_missing=True)[0]


def write_pred(
    path: Path,
    root: Path,
    *,
    samples: list[str] = TEST,
    extra_genes: tuple[str, ...] = (),
    extra_barcode: bool = False,
    uns: dict | None = None,
    seed: int = 0,
) -> Path:
    """A PRED.h5ad: measured log1p + noise on a shuffled subset of spots, fields as `cmrcnet predict` writes."""
    rng = np.random.default_rng(seed)
    ds = PreparedDataset(root)
    genes = [f"G{i:03d}" for i in range(30)] + list(extra_genes)
    blocks, obs, xy = [], [], []
    for sid in samples:
        counts = ds.read_counts(sid)
        keep = rng.permutation(counts.n_obs)[: counts.n_obs - 2]  # shuffled, two spots not predicted
        barcodes = [str(b) for b in counts.obs_names[keep]]
        x = _measured(root, sid, genes, barcodes) + rng.normal(0, 0.5, size=(len(keep), len(genes)))
        if sid == "te1":
            x[:, genes.index(FLAT_PRED_GENE)] = 1.5
        if extra_barcode and sid == samples[0]:
            barcodes[0] = "99x99"
        blocks.append(x.astype(np.float32))
        obs += [(sid, b) for b in barcodes]
        xy.append(np.asarray(counts.obsm["spatial"])[keep])
    a = ad.AnnData(np.concatenate(blocks))
    a.obs_names = [f"{s}:{b}" for s, b in obs]
    a.var_names = genes
    a.obs["sample_id"] = [s for s, _ in obs]
    a.obs["barcode"] = [b for _, b in obs]
    a.obsm["spatial"] = np.concatenate(xy)
    a.uns["cmrcnet"] = (
        uns
        if uns is not None
        else {
            "method": "cmrcnet",
            "run_dir": "runs/x",
            "train_samples": TRAIN,
            "target_sum": TARGET_SUM,
            "gene_mode": "strict",
            "synthetic": False,
            "k": 50,
            "weighting": "softmax",
        }
    )
    a.write_h5ad(path)
    return path


def _arrays(pred_path: Path, root: Path, sid: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    pred = ad.read_h5ad(pred_path)
    sub = pred[pred.obs["sample_id"] == sid]
    genes = list(pred.var_names)
    return np.asarray(sub.X), _measured(root, sid, genes, list(sub.obs["barcode"])), genes


# --- metrics ----------------------------------------------------------------------------------------------
def test_metrics_equal_evaluate_arrays(tmp_path: Path, data_dir: Path) -> None:
    pred_path = write_pred(tmp_path / "PRED.h5ad", data_dir)
    m = evaluate_predictions(pred_path, data_dir, tmp_path / "out", n_top=N_TOP, plots=False)
    assert m["protocol"] == "strict protocol" and m["protocol_id"] == "strict"
    assert m["pcc_pooling"] == "per gene within each test sample, mean over genes, then mean over samples"
    assert m["test_samples"] == TEST and m["synthetic"] is False and m["synthetic_note"] is None
    for sid in TEST:
        pred, true, genes = _arrays(pred_path, data_dir, sid)
        sets = {k: v["genes_per_sample"][sid] for k, v in m["gene_sets"].items() if "genes_per_sample" in v}
        expected = evaluate_arrays(pred, true, genes, gene_sets={**sets, "markers": [], "all": genes})
        got = m["per_sample"][sid]
        for key in (
            "n_spots",
            "n_genes",
            "mse",
            "mae",
            "spotwise_pcc",
            "gene_gene_corr",
            "n_constant_excluded",
        ):
            assert got[key] == pytest.approx(expected[key], rel=1e-9), key
        for name in ("heg5", "hvg5", "all"):
            assert got["gene_sets"][name]["mean_pcc"] == pytest.approx(
                expected["gene_sets"][name]["mean_pcc"]
            )
            assert got["gene_sets"][name]["excluded"] == expected["gene_sets"][name]["excluded"]
        assert got["n_spots_measured"] == 20 and got["n_measured_spots_not_predicted"] == 2
    # overall: mean and sample sd over test samples of the per-sample values, never pooled
    per = [m["per_sample"][s]["gene_sets"]["all"]["mean_pcc"] for s in TEST]
    assert m["overall"]["pcc_all"]["mean"] == pytest.approx(np.mean(per))
    assert m["overall"]["pcc_all"]["std"] == pytest.approx(np.std(per, ddof=1))
    assert m["overall"]["mse"]["mean"] == pytest.approx(np.mean([m["per_sample"][s]["mse"] for s in TEST]))
    # the files are written and consistent
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["overall"] == m["overall"]
    table = pd.read_csv(tmp_path / "out" / "genes.csv")
    assert set(table["sample_id"]) == set(TEST) and len(table) == 60
    assert "| te1 |" in (tmp_path / "out" / "summary.md").read_text()
    assert not list((tmp_path / "out").glob("*.png"))


def test_strict_heg_hvg_come_from_training_samples(tmp_path: Path, data_dir: Path) -> None:
    pred_path = write_pred(tmp_path / "PRED.h5ad", data_dir)
    m = evaluate_predictions(pred_path, data_dir, tmp_path / "out", n_top=N_TOP, plots=False)
    genes = [f"G{i:03d}" for i in range(30)]
    pooled = np.concatenate([_measured(data_dir, s, genes) for s in TRAIN])
    assert m["gene_sets"]["heg5"]["genes"] == top_expressed_genes(pooled, genes, n=N_TOP)
    disp = normalized_dispersion(pooled)
    assert m["gene_sets"]["hvg5"]["genes"] == [genes[i] for i in np.argsort(-disp, kind="stable")[:N_TOP]]
    assert m["gene_sets"]["heg5"]["selected_on"] == TRAIN


def test_strict_selection_never_reads_the_test_sample(tmp_path: Path, data_dir: Path) -> None:
    perturbed = _prepare(tmp_path / "perturbed", perturb_test=True)
    pred_path = write_pred(tmp_path / "PRED.h5ad", data_dir)
    lists = {}
    for protocol in ("strict", "paper"):
        for name, root in (("orig", data_dir), ("perturbed", perturbed)):
            m = evaluate_predictions(
                pred_path, root, tmp_path / f"{protocol}-{name}", protocol=protocol, n_top=N_TOP, plots=False
            )
            lists[protocol, name] = {k: m["gene_sets"][k]["genes_per_sample"] for k in ("heg5", "hvg5")}
            scores = [m["per_sample"][s]["mse"] for s in TEST]
            lists[protocol, name, "mse"] = scores
    assert lists["strict", "orig"] == lists["strict", "perturbed"]
    assert lists["strict", "orig", "mse"] != lists["strict", "perturbed", "mse"]  # the test data did change
    for key in ("heg5", "hvg5"):
        assert lists["paper", "orig"][key]["te1"] != lists["paper", "perturbed"][key]["te1"], key


def test_paper_protocol_is_labelled_everywhere(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    from cmrcnet.plotting import maps

    titles: list[str] = []
    for fn in ("plot_expression_maps", "plot_pcc_distribution"):
        original = getattr(maps, fn)

        def spy(*args, _original=original, **kwargs):
            titles.append(kwargs["title"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(maps, fn, spy)
    pred_path = write_pred(tmp_path / "PRED.h5ad", data_dir)
    out = tmp_path / "out"
    m = evaluate_predictions(
        pred_path, data_dir, out, protocol="paper", n_top=N_TOP, markers=["G001", "G002", "NOPE"], plots=True
    )
    assert m["protocol"] == "paper protocol"
    assert "paper protocol" in m["protocol_note"]
    assert "paper protocol" in (out / "summary.md").read_text()
    assert "paper protocol" in (out / "report.html").read_text()
    assert set(pd.read_csv(out / "genes.csv")["protocol"]) == {"paper protocol"}
    assert m["gene_sets"]["heg5"]["genes"] is None  # chosen per test sample
    assert m["gene_sets"]["markers"]["genes"] == ["G001", "G002"]
    assert m["gene_sets"]["markers"]["not_predicted"] == ["NOPE"]
    maps_png = [f"maps_{s}_{g}.png" for s in TEST for g in ("best", "median", "worst", "markers")]
    expected = [*maps_png, "pcc_distribution.png"]
    assert sorted(expected) == sorted(f for f in m["files"] if f.endswith(".png"))
    for name in expected:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(titles) == len(expected) and all("paper protocol" in t for t in titles)
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_constant_genes_excluded_and_counted(tmp_path: Path, data_dir: Path) -> None:
    pred_path = write_pred(tmp_path / "PRED.h5ad", data_dir)
    m = evaluate_predictions(pred_path, data_dir, tmp_path / "out", n_top=N_TOP, plots=False)
    te1 = m["per_sample"]["te1"]
    # constant in the measured data: excluded; constant in the prediction only: PCC 0 in the headline
    assert te1["gene_sets"]["all"]["excluded"] == [ZERO_GENE]
    assert te1["gene_sets"]["all"]["scored_zero"] == [FLAT_PRED_GENE]
    assert te1["n_constant_excluded"] == 2 and te1["n_constant_true"] == 1 and te1["n_constant_pred"] == 1
    assert te1["gene_sets"]["all"]["n_genes_used"] == 29
    pred, true, genes = _arrays(pred_path, data_dir, "te1")
    keep = [j for j, g in enumerate(genes) if g not in (ZERO_GENE, FLAT_PRED_GENE)]
    r = [np.corrcoef(pred[:, j], true[:, j])[0, 1] for j in keep]
    assert te1["gene_sets"]["all"]["mean_pcc"] == pytest.approx(np.sum(r) / (len(r) + 1))
    assert te1["gene_sets"]["all"]["mean_pcc_excl_constant"] == pytest.approx(np.mean(r))
    assert m["overall"]["pcc_all_excl_constant"]["mean"] is not None
    assert m["overall"]["n_constant_excluded_per_sample"] == {"te1": 2, "te2": 0}
    table = pd.read_csv(tmp_path / "out" / "genes.csv")
    row = table[(table.sample_id == "te1") & (table.gene == ZERO_GENE)].iloc[0]
    assert bool(row["constant"]) and math.isnan(row["pcc"])


def test_gene_missing_from_measured_data_is_reported(tmp_path: Path, data_dir: Path) -> None:
    pred_path = write_pred(tmp_path / "PRED.h5ad", data_dir, extra_genes=("EXTRA1",))
    m = evaluate_predictions(pred_path, data_dir, tmp_path / "out", n_top=N_TOP, plots=False)
    for sid in TEST:
        assert m["per_sample"][sid]["missing_genes"] == ["EXTRA1"]
        assert m["per_sample"][sid]["n_genes"] == 30
        assert m["per_sample"][sid]["gene_sets"]["all"]["missing"] == ["EXTRA1"]
    assert m["gene_sets"]["heg5"]["not_in_training_samples"] == ["EXTRA1"]


# --- errors -----------------------------------------------------------------------------------------------
def test_missing_predicted_spot_is_an_error(tmp_path: Path, data_dir: Path) -> None:
    pred_path = write_pred(tmp_path / "PRED.h5ad", data_dir, extra_barcode=True)
    with pytest.raises(InputFileError, match=r"predicted spots of sample 'te1' are not in the measured data"):
        evaluate_predictions(pred_path, data_dir, tmp_path / "out", plots=False)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_bad_prediction_files(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(InputFileError, match="prediction file not found"):
        evaluate_predictions(tmp_path / "nope.h5ad", data_dir, tmp_path / "out", plots=False)
    corrupt = tmp_path / "corrupt.h5ad"
    corrupt.write_bytes(b"not an h5ad")
    with pytest.raises(InputFileError, match="cannot read prediction h5ad") as info:
        evaluate_predictions(corrupt, data_dir, tmp_path / "out", plots=False)
    assert "corrupt.h5ad" in str(info.value)
    bare = write_pred(tmp_path / "bare.h5ad", data_dir)
    a = ad.read_h5ad(bare)
    del a.uns["cmrcnet"]
    a.write_h5ad(bare)
    with pytest.raises(InputFileError, match=r'no uns\["cmrcnet"\]'):
        evaluate_predictions(bare, data_dir, tmp_path / "out", plots=False)


def test_strict_needs_training_samples_outside_the_test_set(tmp_path: Path, data_dir: Path) -> None:
    uns = {
        "method": "cmrcnet",
        "train_samples": TEST,
        "bank_samples": ["te2"],
        "target_sum": TARGET_SUM,
        "synthetic": True,
    }
    pred_path = write_pred(tmp_path / "PRED.h5ad", data_dir, uns=uns)
    with pytest.raises(ConfigError, match="strict protocol needs the model's training samples"):
        evaluate_predictions(pred_path, data_dir, tmp_path / "out", plots=False)
    m = evaluate_predictions(
        pred_path, data_dir, tmp_path / "out", protocol="paper", n_top=N_TOP, plots=False
    )
    assert m["leakage"]["test_samples_in_training"] == TEST
    assert m["leakage"]["test_samples_in_bank"] == ["te2"]
    assert (
        "WARNING: evaluated samples ['te2'] are in the retrieval bank"
        in (tmp_path / "out" / "summary.md").read_text()
    )
    assert m["synthetic"] is True and "SYNTHETIC data" in m["synthetic_note"]
    assert "SYNTHETIC data" in (tmp_path / "out" / "summary.md").read_text()


def test_strict_needs_the_training_samples_in_the_dataset(tmp_path: Path, data_dir: Path) -> None:
    uns = {"method": "cmrcnet", "train_samples": ["elsewhere"], "target_sum": TARGET_SUM}
    pred_path = write_pred(tmp_path / "PRED.h5ad", data_dir, uns=uns)
    with pytest.raises(InputFileError, match=r"\['elsewhere'\] are not in this dataset"):
        evaluate_predictions(pred_path, data_dir, tmp_path / "out", plots=False)


def test_bad_options(tmp_path: Path, data_dir: Path) -> None:
    pred_path = write_pred(tmp_path / "PRED.h5ad", data_dir)
    with pytest.raises(ConfigError, match="protocol"):
        evaluate_predictions(pred_path, data_dir, tmp_path / "out", protocol="loose", plots=False)
    with pytest.raises(ConfigError, match="n_top"):
        evaluate_predictions(pred_path, data_dir, tmp_path / "out", n_top=0, plots=False)


def test_module_documents_the_hvg_score() -> None:
    assert "normalized_dispersion" in evaluate_mod.__doc__


# --- markers ----------------------------------------------------------------------------------------------
def test_parse_markers(tmp_path: Path) -> None:
    assert parse_markers(None) is None
    assert parse_markers(" ERBB2, GRB7 ,ERBB2") == ["ERBB2", "GRB7"]
    f = tmp_path / "markers.txt"
    f.write_text("# HER2 amplicon\nERBB2\nGRB7  # co-amplified\n\nESR1, PGR\n")
    assert parse_markers(str(f)) == ["ERBB2", "GRB7", "ESR1", "PGR"]
    with pytest.raises(InputFileError, match="marker gene file not found"):
        parse_markers(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(InputFileError, match="lists no genes"):
        parse_markers(str(empty))
    with pytest.raises(ConfigError, match="empty"):
        parse_markers("  ")


def test_default_markers() -> None:
    assert default_markers(["SYN_TUMOR1", "SYN0001"]) == list(SYNTHETIC_MARKERS)
    assert "SYN_NOISE1" not in SYNTHETIC_MARKERS and "SYN_TUMOR1" in SYNTHETIC_MARKERS
    assert default_markers(["ERBB2", "ACTB"]) == list(BREAST_CANCER_MARKERS)
    assert {"ERBB2", "GRB7", "ESR1", "PGR", "KRT19", "KRT8", "KRT18", "EPCAM", "MKI67", "FOXA1"} <= set(
        BREAST_CANCER_MARKERS
    )
