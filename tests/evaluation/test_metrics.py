"""Tests for cmrcnet.evaluation.metrics on small hand-computed examples."""

from __future__ import annotations

import logging
import math
from statistics import correlation

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cmrcnet.errors import ConfigError
from cmrcnet.evaluation.metrics import (
    constant_genes,
    evaluate_arrays,
    gene_gene_correlation_preservation,
    mae,
    mean_pcc,
    mse,
    pearson_per_gene,
    pearson_per_spot,
    spotwise_pcc,
    top_expressed_genes,
    top_variable_genes,
)

# 4 spots x 3 genes. Gene C is constant in the measured data.
TRUE = np.array([[1.0, 0.0, 5.0], [2.0, 0.0, 5.0], [3.0, 1.0, 5.0], [4.0, 1.0, 5.0]])
PRED = np.array([[1.0, 3.0, 2.0], [3.0, 2.0, 2.0], [2.0, 1.0, 4.0], [4.0, 0.0, 3.0]])
# gene A: deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5): r = 4 / sqrt(5 * 5) = 0.8
PCC_A = 4 / math.sqrt(5 * 5)
# gene B: deviations (-.5, -.5, .5, .5) and (1.5, .5, -.5, -1.5): r = -2 / sqrt(1 * 5)
PCC_B = -2 / math.sqrt(1 * 5)
GENES = ["A", "B", "C"]


def test_pearson_per_gene_hand_example() -> None:
    r = pearson_per_gene(PRED, TRUE)
    assert r.shape == (3,) and r.dtype == np.float64
    np.testing.assert_allclose(r[:2], [PCC_A, PCC_B], atol=1e-12)
    np.testing.assert_allclose(r[:2], [correlation(list(PRED[:, g]), list(TRUE[:, g])) for g in (0, 1)])
    assert np.isnan(r[2])  # constant in the measured data: undefined, not 0


def test_constant_gene_excluded_and_counted() -> None:
    result = mean_pcc(PRED, TRUE)
    assert result["mean"] == pytest.approx((PCC_A + PCC_B) / 2, abs=1e-12)  # not (A + B + 0) / 3
    assert result["n_genes"] == 3
    assert result["n_genes_used"] == 2
    assert result["n_excluded_constant"] == 1
    assert result["excluded"] == [2]
    np.testing.assert_array_equal(constant_genes(TRUE), [False, False, True])
    # a gene constant in the prediction only is excluded as well
    pred = PRED.copy()
    pred[:, 0] = 2.5
    np.testing.assert_array_equal(constant_genes(TRUE, pred), [True, False, True])
    assert mean_pcc(pred, TRUE)["excluded"] == [0, 2]
    assert mean_pcc(pred, TRUE)["mean"] == pytest.approx(PCC_B, abs=1e-12)


def test_mean_pcc_gene_subsets() -> None:
    assert mean_pcc(PRED, TRUE, gene_idx=[0])["mean"] == pytest.approx(PCC_A, abs=1e-12)
    assert mean_pcc(PRED, TRUE, gene_idx=np.array([False, True, True]))["excluded"] == [2]
    only_constant = mean_pcc(PRED, TRUE, gene_idx=[2])
    assert math.isnan(only_constant["mean"]) and only_constant["n_excluded_constant"] == 1
    with pytest.raises(ValueError, match=r"gene_idx holds indices outside \[0, 2\]"):
        mean_pcc(PRED, TRUE, gene_idx=[3])


def test_mse_mae_hand_example() -> None:
    # differences pred - true, row by row: (0, 3, -3), (1, 2, -3), (-1, 0, -1), (0, -1, -2)
    squares = [0, 9, 9, 1, 4, 9, 1, 0, 1, 0, 1, 4]
    absolutes = [0, 3, 3, 1, 2, 3, 1, 0, 1, 0, 1, 2]
    assert mse(PRED, TRUE) == pytest.approx(sum(squares) / 12)
    assert mae(PRED, TRUE) == pytest.approx(sum(absolutes) / 12)


def test_perfect_prediction() -> None:
    rng = np.random.default_rng(0)
    true = np.log1p(rng.poisson(2.0, size=(30, 8))).astype(np.float32)
    assert mse(true, true) == 0.0 and mae(true, true) == 0.0
    result = mean_pcc(true, true)
    assert result["mean"] == pytest.approx(1.0) and result["n_excluded_constant"] == 0
    assert spotwise_pcc(true, true)["mean"] == pytest.approx(1.0)
    assert gene_gene_correlation_preservation(true, true) == pytest.approx(1.0)


def test_spotwise_pcc_hand_example() -> None:
    true = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [0.0, 1.0, 0.0]])
    pred = np.array([[1.0, 2.0, 4.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    # spot 0: deviations (-1, 0, 1) and (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 42/9); spots 1 and 2 are constant
    expected = 3 / math.sqrt(2 * 42 / 9)
    r = pearson_per_spot(pred, true)
    assert r[0] == pytest.approx(expected) and np.isnan(r[1:]).all()
    result = spotwise_pcc(pred, true)
    assert result == {"mean": pytest.approx(expected), "n_spots_used": 1, "n_excluded_constant": 2}


def test_gene_gene_preservation_hand_example() -> None:
    a, b, c = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0], [4.0, 3.0, 2.0, 1.0]
    const = [7.0, 7.0, 7.0, 7.0]
    true = np.array([a, b, c, const]).T  # (4 spots, 4 genes); the constant gene is left out
    pred = np.array([a, a, b, [1.0, 2.0, 3.0, 5.0]]).T
    # gene pairs (0,1), (0,2), (1,2): measured r(a,b)=.8, r(a,c)=-1, r(b,c)=-.8; predicted r(a,a)=1, r(a,b)=.8,
    # r(a,b)=.8
    expected = correlation([0.8, -1.0, -0.8], [1.0, 0.8, 0.8])
    assert gene_gene_correlation_preservation(pred, true) == pytest.approx(expected, abs=1e-12)
    # invariant to per-gene positive affine maps of the prediction
    assert gene_gene_correlation_preservation(true * 3.0 + 1.0, true) == pytest.approx(1.0)


def test_gene_gene_preservation_too_few_genes(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cmrcnet.evaluation.metrics"):
        assert math.isnan(gene_gene_correlation_preservation(PRED, TRUE))  # only A and B are usable
    assert "at least 3 non-constant genes, got 2" in caplog.text


def test_evaluate_arrays_reports_sets_and_missing_genes() -> None:
    result = evaluate_arrays(PRED, TRUE, GENES, gene_sets={"heg": ["A", "C", "Z"], "markers": ["B", "B"]})
    heg = result["gene_sets"]["heg"]
    assert heg == {
        "mean_pcc": pytest.approx(PCC_A),
        "mean_pcc_excl_constant": pytest.approx(PCC_A),
        "n_genes": 2,
        "n_genes_used": 1,
        "n_excluded_constant": 1,
        "n_constant_pred_scored_zero": 0,
        "excluded": ["C"],
        "scored_zero": [],
        "missing": ["Z"],
    }
    assert result["gene_sets"]["markers"]["mean_pcc"] == pytest.approx(PCC_B)
    assert result["gene_sets"]["markers"]["n_genes"] == 1  # duplicates counted once
    everything = result["gene_sets"]["all"]
    assert everything["mean_pcc"] == pytest.approx((PCC_A + PCC_B) / 2)
    assert everything["missing"] == [] and everything["excluded"] == ["C"]
    assert result["mse"] == pytest.approx(mse(PRED, TRUE)) and result["mae"] == pytest.approx(mae(PRED, TRUE))
    assert result["spotwise_pcc"] == pytest.approx(spotwise_pcc(PRED, TRUE)["mean"])
    assert (
        result["n_constant_excluded"] == 1
        and result["n_constant_true"] == 1
        and result["n_constant_pred"] == 0
    )
    assert math.isnan(result["gene_gene_corr"])  # two usable genes make a single pair
    table = result["per_gene"]
    assert isinstance(table, pd.DataFrame)
    assert list(table["gene"]) == GENES
    assert list(table["constant"]) == [False, False, True]
    np.testing.assert_allclose(table["mean_true"], [2.5, 0.5, 5.0])
    np.testing.assert_allclose(table["mean_pred"], [2.5, 1.5, 2.75])
    np.testing.assert_allclose(table["var_true"], [5 / 4, 1 / 4, 0.0])
    assert math.isnan(table["pcc"].iloc[2])


def test_evaluate_arrays_input_errors() -> None:
    with pytest.raises(ValueError, match="gene names are not unique: A"):
        evaluate_arrays(PRED, TRUE, ["A", "A", "C"])
    with pytest.raises(ValueError, match="got 2 gene names for 3 genes"):
        evaluate_arrays(PRED, TRUE, ["A", "B"])
    with pytest.raises(ValueError, match=r"pred has shape \(4, 2\) but true has \(4, 3\)"):
        mse(PRED[:, :2], TRUE)
    bad = PRED.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="pred contains 1 NaN or infinite values"):
        pearson_per_gene(bad, TRUE)


def test_sparse_true_is_accepted() -> None:
    result = mean_pcc(PRED, sp.csr_matrix(TRUE))
    assert result["mean"] == pytest.approx((PCC_A + PCC_B) / 2)


# --- gene-set selection ---------------------------------------------------------------------------------
EXPR = np.array([[0.0, 2.0, 1.0, 3.0], [0.0, 2.0, 3.0, 1.0], [0.0, 2.0, 2.0, 2.0]])  # (3 spots, 4 genes)
# means: 0, 2, 2, 2; population variances: 0, 0, 2/3, 2/3
EXPR_GENES = ["g0", "g1", "g2", "g3"]


def test_top_expressed_genes() -> None:
    assert top_expressed_genes(EXPR, EXPR_GENES, n=2) == ["g1", "g2"]  # three-way tie: gene order decides
    assert top_expressed_genes(EXPR * [1, 1, 1.5, 1], EXPR_GENES, n=2) == ["g2", "g1"]
    assert top_expressed_genes(sp.csr_matrix(EXPR), EXPR_GENES, n=3) == ["g1", "g2", "g3"]


def test_top_variable_genes() -> None:
    assert top_variable_genes(EXPR, EXPR_GENES, n=3) == ["g2", "g3", "g0"]
    assert top_variable_genes(EXPR * [1, 1, 1, 2], EXPR_GENES, n=1) == ["g3"]
    assert top_variable_genes(sp.csr_matrix(EXPR), EXPR_GENES, n=2) == ["g2", "g3"]


def test_top_genes_n_handling(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cmrcnet.evaluation.metrics"):
        assert len(top_variable_genes(EXPR, EXPR_GENES, n=50)) == 4
    assert "top 50 variable genes but there are only 4" in caplog.text
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        top_expressed_genes(EXPR, EXPR_GENES, n=0)
    with pytest.raises(ValueError, match="got 3 gene names for 4 genes"):
        top_expressed_genes(EXPR, EXPR_GENES[:3])


def test_gene_constant_in_prediction_scores_zero_in_headline() -> None:
    """A method cannot drop a hard gene by predicting a constant: it scores 0 there (the exclusion mean too)."""
    pred = PRED.copy()
    pred[:, 1] = 0.7  # gene B predicted as a constant; gene C is constant in the measured data
    result = evaluate_arrays(pred, TRUE, GENES)["gene_sets"]["all"]
    assert result["mean_pcc"] == pytest.approx((PCC_A + 0.0) / 2)  # C excluded (data), B scored 0
    assert result["mean_pcc_excl_constant"] == pytest.approx(PCC_A)  # B excluded as well
    assert result["n_genes_used"] == 2 and result["n_excluded_constant"] == 1
    assert result["n_constant_pred_scored_zero"] == 1
    assert result["excluded"] == ["C"] and result["scored_zero"] == ["B"]
    # a set whose only gene is constant in the prediction scores exactly 0, not NaN
    only_b = evaluate_arrays(pred, TRUE, GENES, gene_sets={"b": ["B"]})["gene_sets"]["b"]
    assert only_b["mean_pcc"] == 0.0 and math.isnan(only_b["mean_pcc_excl_constant"])
