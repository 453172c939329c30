"""Metrics for predicted spatial expression (EVALUATION.md), on dense numpy arrays in float64.

Inputs are `pred` and `true` of shape (N spots, G genes), log1p-normalised expression, in the same gene order.
scipy sparse matrices are accepted and densified (the G here is the evaluated gene panel, not the genome).

Constant genes (and spots): a column is constant when its population standard deviation (ddof=0) over the spots
is <= `eps` (default 1e-6; real log1p genes with a single non-zero spot among thousands still have a standard
deviation of about 1e-2). Pearson correlation is undefined for such a column, so the per-gene PCC is NaN. Means
over a gene set treat the two cases differently:
- a gene constant in the MEASURED data is EXCLUDED from every mean and COUNTED (no method can be scored on it,
  so every method has the same denominator);
- a gene constant only in the PREDICTION scores PCC 0 in the headline mean (`mean_pcc`): a method must not be
  able to drop a hard gene by predicting a constant. The mean that excludes it as well is reported alongside
  (`mean_pcc_excl_constant`, the rule of earlier releases).
Spot-wise PCC excludes and counts spots constant in either array.

Non-finite values in `pred` or `true` raise ValueError: a NaN prediction is a bug upstream, not a score.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cmrcnet.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_EPS = 1e-6  # a column with population std <= DEFAULT_EPS counts as constant
ALL_GENES = "all"  # the gene-set name that `evaluate_arrays` always reports


# --- helpers ----------------------------------------------------------------------------------------------
def _as_matrix(x: Any, name: str) -> np.ndarray:
    """Dense 2-D float64 array with finite values."""
    arr = x.toarray() if sp.issparse(x) else x
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (spots, genes), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no spots")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    return arr


def _pair(pred: Any, true: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_matrix(pred, "pred"), _as_matrix(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"pred has shape {p.shape} but true has {t.shape}")
    return p, t


def _is_constant(x: np.ndarray, eps: float) -> np.ndarray:
    """(G,) True where a column's population standard deviation is <= eps."""
    return x.std(axis=0) <= eps  # (G,)


def _pearson_columns(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """(G,) Pearson correlation of matching columns; NaN where either column is constant."""
    ac = a - a.mean(axis=0)  # (N, G)
    bc = b - b.mean(axis=0)  # (N, G)
    undefined = _is_constant(a, eps) | _is_constant(b, eps)  # (G,)
    denom = np.sqrt((ac * ac).sum(axis=0) * (bc * bc).sum(axis=0))  # (G,)
    denom[undefined] = 1.0  # avoid 0/0; overwritten with NaN below
    r = np.clip((ac * bc).sum(axis=0) / denom, -1.0, 1.0)  # (G,)
    r[undefined] = np.nan
    return r


# --- per-gene and per-spot correlation ----------------------------------------------------------------------
def constant_genes(true: Any, pred: Any | None = None, *, eps: float = DEFAULT_EPS) -> np.ndarray:
    """(G,) boolean mask of genes constant in `true` or (when given) in `pred`: population std <= eps."""
    t = _as_matrix(true, "true")
    mask = _is_constant(t, eps)  # (G,)
    if pred is not None:
        p, t = _pair(pred, t)
        mask |= _is_constant(p, eps)
    return mask


def pearson_per_gene(pred: Any, true: Any, *, eps: float = DEFAULT_EPS) -> np.ndarray:
    """(G,) Pearson correlation across spots for each gene; NaN where the gene is constant in either array."""
    p, t = _pair(pred, true)
    return _pearson_columns(p, t, eps)


def pearson_per_spot(pred: Any, true: Any, *, eps: float = DEFAULT_EPS) -> np.ndarray:
    """(N,) Pearson correlation across genes for each spot; NaN where the spot is constant in either array."""
    p, t = _pair(pred, true)
    return _pearson_columns(p.T, t.T, eps)


def mean_pcc(
    pred: Any,
    true: Any,
    gene_idx: Sequence[int] | np.ndarray | None = None,
    *,
    eps: float = DEFAULT_EPS,
) -> dict[str, Any]:
    """Mean per-gene PCC over `gene_idx` (default all genes), constant genes excluded and counted.

    Returns:
        dict with `mean` (float, NaN when no gene is usable), `n_genes` (genes asked for), `n_genes_used`,
        `n_excluded_constant`, and `excluded` (column indices of the excluded genes, in `gene_idx` order).
    """
    p, t = _pair(pred, true)
    cols = np.arange(p.shape[1]) if gene_idx is None else np.asarray(gene_idx)
    if cols.dtype == bool:
        if cols.shape != (p.shape[1],):
            raise ValueError(f"a boolean gene_idx must have {p.shape[1]} entries, got {cols.shape}")
        cols = np.flatnonzero(cols)
    cols = cols.astype(np.int64).reshape(-1)
    if cols.size and (cols.min() < 0 or cols.max() >= p.shape[1]):
        raise ValueError(f"gene_idx holds indices outside [0, {p.shape[1] - 1}]")
    r = _pearson_columns(p[:, cols], t[:, cols], eps)  # (len(cols),)
    used = ~np.isnan(r)
    n_used = int(used.sum())
    if cols.size and n_used == 0:
        logger.warning(
            "all %d genes are constant in the measured data or the prediction; mean PCC is NaN", cols.size
        )
    return {
        "mean": float(r[used].mean()) if n_used else float("nan"),
        "n_genes": int(cols.size),
        "n_genes_used": n_used,
        "n_excluded_constant": int(cols.size - n_used),
        "excluded": [int(c) for c in cols[~used]],
    }


def spotwise_pcc(pred: Any, true: Any, *, eps: float = DEFAULT_EPS) -> dict[str, Any]:
    """Mean over spots of the per-spot PCC across genes; spots constant in either array excluded and counted.

    Returns:
        dict with `mean` (NaN when no spot is usable), `n_spots_used`, `n_excluded_constant`.
    """
    r = pearson_per_spot(pred, true, eps=eps)  # (N,)
    used = ~np.isnan(r)
    n_used = int(used.sum())
    return {
        "mean": float(r[used].mean()) if n_used else float("nan"),
        "n_spots_used": n_used,
        "n_excluded_constant": int(r.size - n_used),
    }


# --- errors and structure -------------------------------------------------------------------------------
def mse(pred: Any, true: Any) -> float:
    """Mean squared error over all (spot, gene) entries of log1p expression."""
    p, t = _pair(pred, true)
    return float(np.mean((p - t) ** 2))


def mae(pred: Any, true: Any) -> float:
    """Mean absolute error over all (spot, gene) entries of log1p expression."""
    p, t = _pair(pred, true)
    return float(np.mean(np.abs(p - t)))


def gene_gene_correlation_preservation(pred: Any, true: Any, *, eps: float = DEFAULT_EPS) -> float:
    """How well the prediction preserves gene-gene co-expression.

    Definition: keep the genes that are non-constant in both `pred` and `true`; compute the Pearson gene-gene
    correlation matrix across spots of each array, (G', G'); take the strict upper triangles (the G'(G'-1)/2
    gene pairs, diagonal excluded); return the Pearson correlation between the two vectors of pair correlations.
    NaN (logged) when fewer than 3 genes are usable or either vector is constant.
    """
    p, t = _pair(pred, true)
    keep = ~(_is_constant(p, eps) | _is_constant(t, eps))  # (G,)
    n_keep = int(keep.sum())
    if n_keep < 3:
        logger.warning(
            "gene-gene correlation needs at least 3 non-constant genes, got %d; returning NaN", n_keep
        )
        return float("nan")
    rows, cols = np.triu_indices(n_keep, k=1)
    pair_pred = np.corrcoef(p[:, keep], rowvar=False)[rows, cols]  # (G'(G'-1)/2,)
    pair_true = np.corrcoef(t[:, keep], rowvar=False)[rows, cols]  # (G'(G'-1)/2,)
    r = _pearson_columns(pair_pred[:, None], pair_true[:, None], eps)[0]
    if np.isnan(r):
        logger.warning("gene-gene correlations are constant in the prediction or the data; returning NaN")
    return float(r)


# --- everything at once ---------------------------------------------------------------------------------
def _set_means(r: np.ndarray, const_true: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Headline and exclusion means of one gene set's per-gene PCC `r` (NaN where constant in either array).

    Genes constant in the measured data (`const_true`) are excluded from both means; genes constant only in the
    prediction score 0 in `mean_pcc` and are excluded from `mean_pcc_excl_constant`.
    """
    zero = np.isnan(r) & ~const_true  # constant in the prediction only
    headline = np.where(zero, 0.0, r)[~const_true]
    defined = r[~np.isnan(r)]
    return {
        "mean_pcc": float(headline.mean()) if headline.size else float("nan"),
        "mean_pcc_excl_constant": float(defined.mean()) if defined.size else float("nan"),
        "n_genes": int(r.size),
        "n_genes_used": int(headline.size),
        "n_excluded_constant": int(const_true.sum()),
        "n_constant_pred_scored_zero": int(zero.sum()),
        "excluded": [g for g, c in zip(names, const_true, strict=True) if c],
        "scored_zero": [g for g, z in zip(names, zero, strict=True) if z],
    }


def evaluate_arrays(
    pred: Any,
    true: Any,
    gene_names: Sequence[str],
    *,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    eps: float = DEFAULT_EPS,
) -> dict[str, Any]:
    """All metrics of EVALUATION.md for one test slide.

    Args:
        pred, true: (N, G) predicted and measured log1p expression, columns in `gene_names` order.
        gene_names: the G gene names (unique).
        gene_sets: named gene lists (e.g. "heg50", "hvg50", "markers"); a set "all" with every gene is added
            unless given. Names absent from `gene_names` are reported under `missing`, not an error.
        eps: constant-column threshold (population std), see the module docstring.

    Returns:
        dict with
        `n_spots`, `n_genes`;
        `gene_sets`: {set name: {"mean_pcc" (headline: genes constant in the prediction score 0),
        "mean_pcc_excl_constant" (those genes excluded instead), "n_genes" (found), "n_genes_used" (in the
        headline mean), "n_excluded_constant" (constant in the measured data), "n_constant_pred_scored_zero",
        "excluded" and "scored_zero" (gene names), "missing" (gene names)}};
        `mse`, `mae`; `spotwise_pcc`, `n_spots_used`, `n_spots_excluded_constant`; `gene_gene_corr`;
        `n_constant_excluded` (genes constant in the data or the prediction), `n_constant_true`,
        `n_constant_pred`; `per_gene`: DataFrame with columns gene, pcc, mean_true, mean_pred, var_true,
        var_pred (ddof=0), constant_true, constant_pred, constant.
    """
    p, t = _pair(pred, true)
    names = [str(g) for g in gene_names]
    if len(names) != p.shape[1]:
        raise ValueError(f"got {len(names)} gene names for {p.shape[1]} genes")
    if len(set(names)) != len(names):
        dupes = sorted({g for g in names if names.count(g) > 1})
        raise ValueError(f"gene names are not unique: {', '.join(dupes[:10])}")
    position = {g: i for i, g in enumerate(names)}

    const_true, const_pred = _is_constant(t, eps), _is_constant(p, eps)  # (G,), (G,)
    pcc = _pearson_columns(p, t, eps)  # (G,)

    sets: dict[str, Sequence[str]] = dict(gene_sets or {})
    sets.setdefault(ALL_GENES, names)
    set_results: dict[str, dict[str, Any]] = {}
    for set_name, genes in sets.items():
        wanted = list(dict.fromkeys(str(g) for g in genes))  # unique, order kept
        missing = [g for g in wanted if g not in position]
        if missing:
            logger.warning(
                "gene set %r: %d of %d genes are not in the panel", set_name, len(missing), len(wanted)
            )
        cols = np.array([position[g] for g in wanted if g in position], dtype=np.int64)
        set_results[set_name] = {**_set_means(pcc[cols], const_true[cols], [names[c] for c in cols]),
                                 "missing": missing}

    spot = spotwise_pcc(p, t, eps=eps)
    per_gene = pd.DataFrame(
        {
            "gene": names,
            "pcc": pcc,
            "mean_true": t.mean(axis=0),
            "mean_pred": p.mean(axis=0),
            "var_true": t.var(axis=0),
            "var_pred": p.var(axis=0),
            "constant_true": const_true,
            "constant_pred": const_pred,
            "constant": const_true | const_pred,
        }
    )
    return {
        "n_spots": int(p.shape[0]),
        "n_genes": int(p.shape[1]),
        "gene_sets": set_results,
        "mse": mse(p, t),
        "mae": mae(p, t),
        "spotwise_pcc": spot["mean"],
        "n_spots_used": spot["n_spots_used"],
        "n_spots_excluded_constant": spot["n_excluded_constant"],
        "gene_gene_corr": gene_gene_correlation_preservation(p, t, eps=eps),
        "n_constant_excluded": int((const_true | const_pred).sum()),
        "n_constant_true": int(const_true.sum()),
        "n_constant_pred": int(const_pred.sum()),
        "per_gene": per_gene,
    }


# --- gene-set selection -----------------------------------------------------------------------------------
def _gene_stats(log_expr: Any, gene_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(G,) mean and population variance (ddof=0) over spots, in float64; sparse input stays sparse."""
    names = [str(g) for g in gene_names]
    if sp.issparse(log_expr):
        x = sp.csr_matrix(log_expr, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"log_expr must be 2-D with at least one spot, got shape {x.shape}")
        if not np.isfinite(x.data).all():
            raise ValueError("log_expr contains NaN or infinite values")
        mean = np.asarray(x.mean(axis=0)).ravel()  # (G,)
        var = np.maximum(np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2, 0.0)  # (G,)
    else:
        x = _as_matrix(log_expr, "log_expr")
        mean, var = x.mean(axis=0), x.var(axis=0)  # (G,), (G,)
    if len(names) != mean.size:
        raise ValueError(f"got {len(names)} gene names for {mean.size} genes")
    return mean, var, names


def _top(score: np.ndarray, names: list[str], n: int, what: str) -> list[str]:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")
    if n > len(names):
        logger.warning(
            "asked for the top %d %s genes but there are only %d; returning all", n, what, len(names)
        )
    order = np.argsort(-score, kind="stable")[:n]  # ties keep the input gene order
    return [names[i] for i in order]


def top_expressed_genes(log_expr: Any, gene_names: Sequence[str], *, n: int = 50) -> list[str]:
    """The `n` genes with the highest mean log1p expression over the given spots (HEG), highest first.

    Pure: the caller chooses the spots (strict protocol: training slides only; paper protocol: the test slide).
    Ties keep the order of `gene_names`.
    """
    mean, _, names = _gene_stats(log_expr, gene_names)
    return _top(mean, names, n, "expressed")


def top_variable_genes(log_expr: Any, gene_names: Sequence[str], *, n: int = 50) -> list[str]:
    """The `n` genes with the highest variance of log1p-normalised expression (HVG), highest first.

    Dispersion definition: the population variance (ddof=0) over the given spots of the log1p-normalised values,
    as given; no mean-binning or normalised dispersion (unlike scanpy's "seurat" flavour). Pure: the caller
    chooses the spots. Ties keep the order of `gene_names`.
    """
    _, var, names = _gene_stats(log_expr, gene_names)
    return _top(var, names, n, "variable")
