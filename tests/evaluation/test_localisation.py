"""Tumour score, AUROC / average precision (against hand-computed values) and `cmrcnet localise-eval`."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

from cmrcnet.cli import main
from cmrcnet.data.markers import BREAST_TUMOUR_MARKERS, default_tumour_markers
from cmrcnet.errors import ConfigError
from cmrcnet.evaluation.localisation import (
    auroc,
    average_precision,
    average_ranks,
    localise_eval,
    match_points,
    tumour_score,
)


# --- AUROC ------------------------------------------------------------------------------------------------
def test_auroc_perfect_reversed_and_tied() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert auroc(s, y) == 1.0
    assert auroc(-s, y) == 0.0
    assert auroc(np.full(6, 0.4), y) == 0.5


def test_auroc_with_ties_by_hand() -> None:
    # positives {0.4, 0.8} vs negatives {0.1, 0.4}: pairs 1 + 0.5 (tie) + 1 + 1 = 3.5 of 4
    assert auroc(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0, 1, 0, 1])) == pytest.approx(0.875)


def test_average_ranks_match_scipy() -> None:
    x = np.array([3.0, 1.0, 2.0, 3.0, 3.0, 0.5, 2.0])
    np.testing.assert_array_equal(average_ranks(x), rankdata(x, method="average"))
    assert average_ranks(x).tolist() == [6.0, 2.0, 3.5, 6.0, 6.0, 1.0, 3.5]


# --- average precision ------------------------------------------------------------------------------------
def test_average_precision_by_hand() -> None:
    # sklearn's documented example: descending 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg)
    # P/R after each threshold: 1/0.5, 0.5/0.5, 2/3/1, 0.5/1 -> AP = 0.5 * 1 + 0.5 * 2/3 = 0.8333
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert average_precision(s, y) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])) == 1.0


def test_average_precision_groups_tied_scores() -> None:
    # threshold 0.5 takes both tied items at once: P 1/2, R 1/2; threshold 0.2: P 2/3, R 1
    # AP = 0.5 * 0.5 + 0.5 * 2/3
    assert average_precision(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 1])) == pytest.approx(0.25 + 1 / 3)


def test_metrics_need_both_classes_and_finite_scores() -> None:
    with pytest.raises(ValueError, match="positive and negative"):
        auroc(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([np.nan, 0.2]), np.array([1, 0]))


# --- tumour score -----------------------------------------------------------------------------------------
def test_tumour_score_is_mean_marker_z_score() -> None:
    genes = ["ERBB2", "GRB7", "ACTB", "KRT8"]
    x = np.array([[1.0, 2.0, 5.0, 3.0], [3.0, 4.0, 5.0, 3.0], [2.0, 0.0, 5.0, 3.0]])
    score, used = tumour_score(x, genes, ["ERBB2", "GRB7", "KRT8", "NOTPREDICTED"])
    assert used == ["ERBB2", "GRB7"]  # KRT8 is constant over the tiles, NOTPREDICTED absent
    z = (x[:, :2] - x[:, :2].mean(0)) / x[:, :2].std(0)
    np.testing.assert_allclose(score, z.mean(1))
    with pytest.raises(ConfigError, match="none of the marker genes"):
        tumour_score(x, genes, ["MUC1"])


def test_default_tumour_markers() -> None:
    assert {"ERBB2", "GRB7"} <= set(BREAST_TUMOUR_MARKERS)
    assert default_tumour_markers(["ERBB2", "ACTB"]) == list(BREAST_TUMOUR_MARKERS)
    assert default_tumour_markers(["SYN_TUMOR1", "SYN0001"]) == ["SYN_TUMOR1", "SYN_TUMOR2", "SYN_TUMOR3"]


# --- matching and localise-eval ---------------------------------------------------------------------------
def test_points_match_the_tile_that_contains_them() -> None:
    centers = np.array([[50.0, 50.0], [150.0, 50.0]])
    points = np.array([[99.0, 99.0], [101.0, 10.0], [150.0, 101.0], [300.0, 50.0]])
    assert match_points(centers, points, 50.0).tolist() == [0, 1, -1, -1]


def _slide_prediction(path: Path) -> ad.AnnData:
    """A 4 x 5 grid of 100-px tiles: tumour in the left two columns (score 2 - col), ERBB2 follows the score."""
    rows, cols = np.divmod(np.arange(20), 5)
    a = ad.AnnData(np.stack([2.0 - cols, np.ones(20)], axis=1).astype(np.float32))
    a.var_names = ["ERBB2", "ACTB"]
    a.obs_names = [f"r{r}c{c}" for r, c in zip(rows, cols, strict=True)]
    a.obs["tumour_score"] = 2.0 - cols
    a.obsm["spatial"] = np.stack([50.0 + 100 * cols, 50.0 + 100 * rows], axis=1)
    a.uns["cmrcnet"] = {"kind": "slide_prediction", "fov_px": 100.0}
    a.write_h5ad(path)
    return a


def _labels(path: Path) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 500, 40)
    y = rng.uniform(0, 400, 40)
    label = np.where(x < 200, "invasive cancer", np.where(x < 300, "stroma", "immune infiltrate"))
    df = pd.DataFrame({"x": x, "y": y, "label": label})
    df = pd.concat(
        [df, pd.DataFrame({"x": [900.0], "y": [900.0], "label": ["stroma"]})]
    )  # outside: unmatched
    df.to_csv(path, sep="\t", index=False)
    return df


def test_localise_eval_perfect_score(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred, labels, out = tmp_path / "pred.h5ad", tmp_path / "labels.tsv", tmp_path / "res" / "loc.json"
    _slide_prediction(pred)
    _labels(labels)
    rc = main(
        ["localise-eval", "--pred", str(pred), "--labels", str(labels), "--positive", "invasive cancer",
         "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    assert "AUROC 1.000" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["auroc"] == 1.0 and report["average_precision"] == 1.0
    assert report["n_matched"] == 40 and report["n_unmatched"] == 1 and report["max_distance_px"] == 50.0
    # a gene as the score; two positive labels; reversed ranking
    r = localise_eval(pred, labels, ["stroma", "immune infiltrate"], score_key="ERBB2")
    assert r["auroc"] == 0.0 and r["n_positive"] == (np.asarray(_labels(labels)["x"])[:40] >= 200).sum()


def test_localise_eval_computes_the_score_for_spot_predictions(tmp_path: Path) -> None:
    """`cmrcnet predict` output has no tumour_score: it is computed from the markers; distance from the pitch."""
    a = ad.AnnData(np.array([[3.0, 2.0], [1.0, 0.0], [2.0, 1.0], [0.0, 0.5]], dtype=np.float32))
    a.var_names = ["ERBB2", "GRB7"]
    a.obs_names = ["s0", "s1", "s2", "s3"]
    a.obsm["spatial"] = np.array([[0.0, 0.0], [200.0, 0.0], [0.0, 200.0], [200.0, 200.0]])
    a.write_h5ad(tmp_path / "p.h5ad")
    pd.DataFrame(
        {
            "x": [5, 195, 2, 210, 400],
            "y": [3, 5, 198, 190, 0],
            "label": ["tumour", "normal", "tumour", "normal", "x"],
        }
    ).to_csv(tmp_path / "l.tsv", sep="\t", index=False)
    r = localise_eval(tmp_path / "p.h5ad", tmp_path / "l.tsv", ["tumour"])
    assert r["max_distance_px"] == 100.0 and r["n_matched"] == 4 and r["auroc"] == 1.0
    assert "ERBB2" in r["score"]


def test_her2st_label_layout_uses_pixel_columns(tmp_path: Path) -> None:
    _slide_prediction(tmp_path / "pred.h5ad")
    pd.DataFrame(
        {"x": [1, 2, 3], "y": [1, 1, 1], "pixel_x": [50.0, 450.0, np.nan], "pixel_y": [50.0, 50.0, 10.0],
         "label": ["invasive cancer", "connective tissue", "invasive cancer"]}
    ).to_csv(tmp_path / "lbl.tsv", sep="\t", index=False)  # fmt: skip
    r = localise_eval(tmp_path / "pred.h5ad", tmp_path / "lbl.tsv", ["invasive cancer"])
    assert r["n_label_points"] == 2 and r["auroc"] == 1.0


def test_localise_eval_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred, labels = tmp_path / "pred.h5ad", tmp_path / "labels.tsv"
    _slide_prediction(pred)
    _labels(labels)
    base = ["localise-eval", "--pred", str(pred), "--labels", str(labels)]
    assert main([*base, "--positive", "necrosis"]) == 2
    assert "necrosis" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    pd.DataFrame({"col": [1], "row": [2], "label": ["a"]}).to_csv(bad, sep="\t", index=False)
    assert main(["localise-eval", "--pred", str(pred), "--labels", str(bad), "--positive", "a"]) == 2
    err = capsys.readouterr().err
    assert "bad.tsv" in err and "x" in err
    assert main([*base, "--positive", "invasive cancer", "--score-key", "nothing"]) == 2
    assert "nothing" in capsys.readouterr().err


def test_other_labels_are_negative_unless_ignored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every label other than the positive ones is negative; --ignore leaves labels out before matching."""
    a = ad.AnnData(np.zeros((4, 1), dtype=np.float32))
    a.var_names = ["G"]
    a.obs_names = ["s0", "s1", "s2", "s3"]
    a.obs["tumour_score"] = [3.0, 0.0, 2.0, 5.0]  # the undetermined spot scores highest
    a.obsm["spatial"] = np.array([[0.0, 0.0], [200.0, 0.0], [0.0, 200.0], [200.0, 200.0]])
    a.write_h5ad(tmp_path / "p.h5ad")
    pd.DataFrame(
        {"x": [0, 200, 0, 200], "y": [0, 0, 200, 200], "label": ["tumour", "normal", "tumour", " undetermined"]}
    ).to_csv(tmp_path / "l.tsv", sep="\t", index=False)  # fmt: skip
    r = localise_eval(tmp_path / "p.h5ad", tmp_path / "l.tsv", ["tumour"])
    assert r["n_negative"] == 2 and r["auroc"] == 0.5 and r["n_ignored"] == 0  # undetermined is negative
    r = localise_eval(tmp_path / "p.h5ad", tmp_path / "l.tsv", ["tumour"], ignore=["undetermined"])
    assert r["n_negative"] == 1 and r["auroc"] == 1.0 and r["n_ignored"] == 1 and r["n_matched"] == 3
    base = ["localise-eval", "--pred", str(tmp_path / "p.h5ad"), "--labels", str(tmp_path / "l.tsv")]
    assert main([*base, "--positive", "tumour", "--ignore", "undetermined"]) == 0
    assert "AUROC 1.000" in capsys.readouterr().out
    assert main([*base, "--positive", "tumour", "--ignore", "tumour"]) == 2
    assert "both positive and ignored" in capsys.readouterr().err
