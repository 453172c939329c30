"""Choosing the number of retrieved neighbours k the way the test works: from other sections.

Leave-one-training-section-out: every training section in turn is the query; the bank is the other training
sections (plus any expression-only bank sections, which never include the test patient); the prediction is the
mean expression of the k nearest bank spots; the score is the mean over validation sections of the mean
per-gene PCC over the HEG genes of the training spots (genes constant in the prediction score 0). The test
section is never an input: the functions here receive training arrays only.

With a single training section, leave-one-section-out is impossible: the section is cut into two spatial halves
(by the median x coordinate) and each half retrieves from the other (labelled "two spatial halves").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

K_GRID = (5, 10, 20, 50, 100, 200, 400, 800, 1600)  # clamped to the bank size

# similarity(query_rows, bank_rows) -> (Q, B) scores where LARGER is closer
Similarity = Callable[[np.ndarray, np.ndarray], np.ndarray]


def pcc_columns(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(G,) PCC per column; 0 where the prediction is constant, NaN where the truth is constant."""
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    sp, st = np.sqrt((p * p).sum(0)), np.sqrt((t * t).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / (sp * st)
    r = np.where(sp <= 1e-9, 0.0, r)
    return np.where(st <= 1e-9, np.nan, r)


def heg_columns(expr_train: np.ndarray, n: int = 50) -> np.ndarray:
    """Column indices of the n genes of highest mean over the training spots."""
    return np.argsort(-expr_train.mean(0), kind="stable")[:n]


def validation_groups(sections: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, str]:
    """Group label per training spot for leave-one-group-out, and how the groups were formed."""
    if len(np.unique(sections)) > 1:
        return sections.astype(str), "leave-one-training-section-out"
    half = np.where(coords[:, 0] <= np.median(coords[:, 0]), "left", "right")
    return half.astype(str), "two spatial halves of the single training section"


def choose_k(similarity: Similarity, expr: np.ndarray, groups: np.ndarray, *, n_extra: int = 0,
             extra_expr: np.ndarray | None = None, grid: Sequence[int] = K_GRID,
             heg: np.ndarray | None = None) -> tuple[int, dict[int, float]]:
    """The k of `grid` with the best leave-one-group-out HEG PCC over the training spots.

    Args:
        similarity: scores between row indices (query rows, bank rows) of the training spots; bank rows >=
            len(expr) address the `n_extra` expression-only bank spots (their `extra_expr` rows).
        expr: (N, G) training expression; groups: (N,) validation group of each training spot.
        heg: columns scored (default: the HEG-50 of `expr`).

    Returns:
        (k, {k: score}); ties go to the smaller k; k values above the largest bank are clamped.
    """
    heg = heg_columns(expr) if heg is None else heg
    scored = expr[:, heg] if not n_extra else np.concatenate([expr[:, heg], extra_expr[:, heg]])  # (N + E, H)
    scores: dict[int, list[float]] = {}
    for g in np.unique(groups):
        q = np.flatnonzero(groups == g)
        bank = np.concatenate([np.flatnonzero(groups != g), len(expr) + np.arange(n_extra)])
        if q.size < 3 or bank.size == 0:
            continue
        k_max = min(max(grid), bank.size)
        order = np.argsort(-similarity(q, bank), axis=1, kind="stable")[:, :k_max]  # (Q, k_max) best first
        running = np.cumsum(scored[bank[order]], axis=1)  # (Q, k_max, H): sums over the first j neighbours
        for k in grid:
            k_eff = min(k, bank.size)
            pred = running[:, k_eff - 1] / k_eff  # (Q, H) mean of the k nearest
            r = pcc_columns(pred, expr[q][:, heg])
            scores.setdefault(k_eff, []).append(float(np.nanmean(r)) if np.isfinite(r).any() else math.nan)
    mean = {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in scores.items()}
    if not mean:
        raise ValueError("no validation group with at least 3 spots and a non-empty bank")
    best = max(sorted(mean), key=lambda k: -math.inf if math.isnan(mean[k]) else mean[k])
    return best, mean


def cosine_similarity(query_emb: np.ndarray, bank_emb: np.ndarray) -> Similarity:
    """Similarity over row indices: cosine between image embeddings (queries) and expression embeddings (bank)."""
    q = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True).clip(1e-12)
    b = bank_emb / np.linalg.norm(bank_emb, axis=1, keepdims=True).clip(1e-12)
    return lambda qi, bi: q[qi] @ b[bi].T


def euclidean_similarity(features: np.ndarray) -> Similarity:
    """Similarity over row indices: minus the Euclidean distance of features z-scored on the bank rows."""
    def sim(qi: np.ndarray, bi: np.ndarray) -> np.ndarray:
        mu, sd = features[bi].mean(0), features[bi].std(0).clip(1e-6)
        q, b = (features[qi] - mu) / sd, (features[bi] - mu) / sd
        d2 = (q * q).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * q @ b.T
        return -np.sqrt(np.maximum(d2, 0.0))
    return sim
