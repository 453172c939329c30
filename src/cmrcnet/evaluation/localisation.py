"""Cancer localisation from predicted expression: a tumour score per tile/spot, and its AUROC/AP against labels.

The tumour score itself is computed at prediction time (`cmrcnet.inference.tumour`); here it is only evaluated.

`localise_eval` matches pathologist label points (TSV with full-resolution pixel columns x, y and a label) to the
nearest predicted tile/spot centre and reports how well the score ranks the positive labels above the others:
AUROC (rank-based, ties counted half) and average precision (sklearn's step-wise definition). Both are written
here in numpy so the definitions are explicit and tested against hand-computed values.

Label conventions (what the code does):

- **Reading.** Columns x, y (full-resolution pixels of the predicted image) and label, optionally sample_id.
  her2st's ``*_labeled_coordinates.tsv`` is read through its pixel_x, pixel_y columns (its x, y are array
  coordinates and are dropped). Rows without coordinates or label are dropped with a warning. Labels are
  stripped of surrounding spaces and then compared exactly (case-sensitive).
- **Positive.** The labels given as `positive` (``--positive``), e.g. "invasive cancer" and "cancer in situ".
  A positive label absent from the file is an error that lists the file's labels.
- **Ignored.** The labels given as `ignore` (``--ignore``, none by default), e.g. "undetermined", are removed
  before matching. Also left out: points that match no tile/spot (counted as unmatched).
- **Negative.** Every other label (immune infiltrate, connective tissue, adipose tissue, breast glands, and
  "undetermined" unless ignored).
- **Matching.** Each point takes the score of the nearest predicted centre in Chebyshev distance (max(|dx|, |dy|))
  if that distance is at most half a tile: for a predict-slide prediction half the tile side (the point lies in
  that square tile), for spot predictions half the median distance between neighbouring spots, or
  `max_distance_px` (``--max-distance``) pixels. With a sample_id column points are matched within their own sample only; without
  it the prediction must hold one sample. Each point counts once, so two points in one tile both count (with the
  tile's score).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from cmrcnet import __version__
from cmrcnet.atomic import write_json
from cmrcnet.constants import CMRCNET_UNS, SAMPLE_KEY, SPATIAL_KEY
from cmrcnet.errors import ConfigError, InputFileError, require_file
from cmrcnet.inference.tumour import SCORE_KEY, tumour_score

logger = logging.getLogger(__name__)


# --- ranking metrics ----------------------------------------------------------------------------------------
def _check_binary(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("need both positive and negative labels to rank")
    return s, y


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` (ascending); tied values share the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]  # (N,) first element of each tie group
    group = np.cumsum(new_group) - 1  # (N,) tie-group index of each sorted element
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(x)]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > that of a random negative), ties counting 1/2.

    Computed from ranks (Mann-Whitney U / (n_pos * n_neg)) with average ranks for ties.
    """
    s, y = _check_binary(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    ranks = average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision as in sklearn: sum over distinct score thresholds (descending) of
    (R_n - R_{n-1}) * P_n, where P_n and R_n are the precision and recall of "score >= threshold n"."""
    s, y = _check_binary(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last_of_threshold].astype(np.float64)
    fps = (last_of_threshold + 1) - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# --- labels and matching ------------------------------------------------------------------------------------
def read_labels(path: str | Path) -> pd.DataFrame:
    """Label points: a TSV with columns x, y (full-resolution pixels) and label, optionally sample_id.

    her2st's `*_labeled_coordinates.tsv` (x, y = array coordinates; pixel_x, pixel_y = pixels) is read through its
    pixel columns. Rows without coordinates or label are dropped (with a warning).
    """
    path = require_file(path, "label file")
    try:
        df = pd.read_csv(path, sep="\t")
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputFileError(f"cannot read label TSV ({exc})", path=path) from exc
    if {"pixel_x", "pixel_y"} <= set(df.columns):
        df = df.drop(columns=[c for c in ("x", "y") if c in df.columns]).rename(
            columns={"pixel_x": "x", "pixel_y": "y"}
        )
    missing = [c for c in ("x", "y", "label") if c not in df.columns]
    if missing:
        raise InputFileError(
            f"label TSV lacks column(s) {missing}; expected x, y (full-resolution pixels) and label "
            f"(found {list(df.columns)})",
            path=path,
        )
    keep = ["x", "y", "label"] + ([SAMPLE_KEY] if SAMPLE_KEY in df.columns else [])
    df = df[keep].copy()
    for c in ("x", "y"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    ok = np.isfinite(df["x"].to_numpy(float)) & np.isfinite(df["y"].to_numpy(float)) & df["label"].notna()
    if not ok.all():
        logger.warning(
            "%s: %d of %d label rows lack coordinates or a label and are ignored",
            path,
            int((~ok).sum()),
            len(df),
        )
    df = df[ok].reset_index(drop=True)
    df["label"] = df["label"].astype(str).str.strip()
    if df.empty:
        raise InputFileError("label TSV has no usable rows", path=path)
    return df


def match_points(centers: np.ndarray, points: np.ndarray, half_side: float) -> np.ndarray:
    """Index of the centre nearest each point, or -1 when it is further than `half_side` in x or y.

    Distances are Chebyshev (max of |dx|, |dy|): a point matches the square tile (side 2 * half_side) that
    contains it.
    """
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(centers) == 0 or len(points) == 0:
        return np.full(len(points), -1, dtype=np.int64)
    dist, idx = cKDTree(centers).query(points, k=1, p=np.inf)
    return np.where(dist <= half_side, idx, -1).astype(np.int64)


def _half_tile(adata: ad.AnnData) -> tuple[float, str]:
    """Half the side of a prediction's tiles: from the slide prediction, else half the spot pitch."""
    info = adata.uns.get(CMRCNET_UNS, {})
    if "fov_px" in info:
        return float(info["fov_px"]) / 2.0, "half the tile side"
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    if len(xy) < 2:
        raise ConfigError("cannot infer a matching distance from a single spot; give max_distance_px=")
    dist, _ = cKDTree(xy).query(xy, k=2)
    nearest = dist[:, 1][dist[:, 1] > 0]
    if not nearest.size:
        raise ConfigError("all spot centres coincide; give max_distance_px=")
    return float(np.median(nearest)) / 2.0, "half the median spot spacing"


def _score_column(adata: ad.AnnData, score_key: str, markers: Sequence[str] | None) -> tuple[np.ndarray, str]:
    if score_key in adata.obs.columns:
        return adata.obs[score_key].to_numpy(dtype=np.float64), f"obs[{score_key!r}]"
    if score_key in adata.var_names:
        col = adata[:, score_key].X
        col = col.toarray() if hasattr(col, "toarray") else np.asarray(col)
        return np.asarray(col, dtype=np.float64).ravel(), f"predicted expression of {score_key}"
    if score_key == SCORE_KEY:
        score, used = tumour_score(np.asarray(adata.X), list(adata.var_names), markers)
        logger.info("no obs[%r]: computed the tumour score from markers %s", SCORE_KEY, used)
        return score, f"tumour score of markers {used}"
    numeric = [c for c in adata.obs.columns if pd.api.types.is_numeric_dtype(adata.obs[c])]
    raise ConfigError(
        f"score {score_key!r} is neither an obs column ({numeric}) nor a gene of the prediction"
    )


def localise_eval(
    pred_path: str | Path,
    labels_path: str | Path,
    positive: Sequence[str],
    *,
    score_key: str = SCORE_KEY,
    markers: Sequence[str] | None = None,
    max_distance_px: float | None = None,
    out_path: str | Path | None = None,
    ignore: Sequence[str] = (),
) -> dict[str, Any]:
    """AUROC and average precision of a prediction's score against pathologist label points.

    Args:
        pred_path: prediction .h5ad (`cmrcnet predict-slide`, or `cmrcnet predict` spots).
        labels_path: label TSV (`read_labels`).
        positive: labels that count as positive (e.g. "invasive cancer", "cancer in situ"); every other label
            that is not in `ignore` counts as negative. Labels compare exactly after stripping spaces.
        score_key: obs column, or a gene name; "tumour_score" is computed from `markers` when absent.
        max_distance_px: matching distance (Chebyshev, full-resolution pixels); default half a tile.
        out_path: write the report as JSON here (atomically) when given.
        ignore: labels left out before matching (e.g. "undetermined"); default none (all labels rank).

    Each label point takes the score of the nearest tile/spot centre within the matching distance; points with
    no tile that close (e.g. on tissue the tissue detector missed) are counted and left out. The conventions in
    full are in the module docstring.
    """
    pred_path = require_file(pred_path, "prediction")
    try:
        adata = ad.read_h5ad(pred_path)
    except Exception as exc:  # h5py/anndata raise many types for corrupt files
        raise InputFileError(f"cannot read prediction ({type(exc).__name__}: {exc})", path=pred_path) from exc
    if SPATIAL_KEY not in adata.obsm:
        raise InputFileError(f"prediction has no obsm[{SPATIAL_KEY!r}] centres", path=pred_path)
    labels = read_labels(labels_path)
    positive = [str(p).strip() for p in positive]
    known = sorted(labels["label"].unique())
    unknown = [p for p in positive if p not in known]
    if unknown:
        raise ConfigError(f"positive label(s) {unknown} not in {labels_path}; its labels are {known}")
    ignore = [str(i).strip() for i in ignore]
    both = sorted(set(ignore) & set(positive))
    if both:
        raise ConfigError(f"label(s) {both} are both positive and ignored")
    ignored = labels["label"].isin(ignore).to_numpy()
    if ignored.any():
        logger.info("%d label points with labels %s are ignored", int(ignored.sum()), sorted(set(ignore)))
    n_all = len(labels)
    labels = labels[~ignored].reset_index(drop=True)
    score, score_desc = _score_column(adata, score_key, markers)
    if max_distance_px is None:
        half, half_desc = _half_tile(adata)
    else:
        if not max_distance_px > 0:
            raise ConfigError(f"max distance must be positive, got {max_distance_px}")
        half, half_desc = float(max_distance_px), "given"
    centers = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    points = labels[["x", "y"]].to_numpy(np.float64)
    match = np.full(len(labels), -1, dtype=np.int64)
    pred_samples = (
        adata.obs[SAMPLE_KEY].astype(str).to_numpy()
        if SAMPLE_KEY in adata.obs
        else np.array(["?"] * adata.n_obs)
    )
    if SAMPLE_KEY in labels.columns:
        for sid in labels[SAMPLE_KEY].astype(str).unique():
            lab_rows = np.flatnonzero(labels[SAMPLE_KEY].astype(str).to_numpy() == sid)
            pred_rows = np.flatnonzero(pred_samples == sid)
            m = match_points(centers[pred_rows], points[lab_rows], half)
            match[lab_rows] = np.where(m >= 0, pred_rows[np.maximum(m, 0)], -1)
    else:
        if len(set(pred_samples.tolist())) > 1:
            raise ConfigError(
                f"the prediction holds several samples {sorted(set(pred_samples.tolist()))}; "
                f"add a {SAMPLE_KEY} column to the label TSV"
            )
        match = match_points(centers, points, half)
    ok = match >= 0
    if not ok.any():
        raise ConfigError(
            f"no label point lies within {half:.1f} px of a predicted centre; are the labels in "
            "full-resolution pixels of the same image?"
        )
    y = labels["label"].to_numpy()[ok]
    is_pos = np.isin(y, positive)
    s = score[match[ok]]
    if is_pos.all() or not is_pos.any():
        raise ConfigError(
            f"the {int(ok.sum())} matched label points are all {'positive' if is_pos.all() else 'negative'}; "
            "AUROC needs both"
        )
    report = {
        "kind": "localisation",
        "prediction": str(pred_path),
        "labels": str(labels_path),
        "score": score_desc,
        "score_key": score_key,
        "positive": positive,
        "ignored": ignore,
        "negative": "every other label",
        "n_label_points": n_all,
        "n_ignored": int(ignored.sum()),
        "n_matched": int(ok.sum()),
        "n_unmatched": int((~ok).sum()),
        "n_positive": int(is_pos.sum()),
        "n_negative": int((~is_pos).sum()),
        "max_distance_px": half,
        "max_distance_rule": half_desc,
        "label_counts": {str(k): int(v) for k, v in pd.Series(y).value_counts().items()},
        "auroc": auroc(s, is_pos),
        "average_precision": average_precision(s, is_pos),
        "prevalence": float(is_pos.mean()),  # the average precision of a random score
        "cmrcnet_version": __version__,
    }
    if out_path is not None:
        write_json(out_path, report)
    return report
