"""Spatial smoothing of predictions over neighbouring spots or tiles, from the predictions alone.

Expression varies smoothly over tissue at the scale of a few spots, while each spot's prediction carries the
noise of one image patch. Averaging a spot's prediction with its neighbours' predictions trades a little spatial
detail for less noise. Only predictions (which come from images) are used, never measured expression, so the
smoothing is as available on a new H&E slide as on a test section.

    smoothed_i = (1 - w) * pred_i + w * mean(pred_j for neighbours j of i)

Neighbours are the other spots within `radius_factor` times the grid pitch (the median distance from a spot to
its nearest neighbour); a spot without neighbours keeps its prediction.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from cmrcnet.errors import ConfigError


def check_weight(weight: float) -> None:
    """ConfigError unless the smoothing weight is in [0, 1] (callers check it before a long prediction)."""
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"smooth= (the weight of the neighbours' mean) must be in [0, 1], got {weight}")


def grid_pitch(coords: np.ndarray) -> float:
    """Median nearest-neighbour distance between spot centres (in the units of `coords`)."""
    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) < 2:
        return 0.0
    dist, _ = cKDTree(coords).query(coords, k=2)  # (N, 2): self, nearest other
    return float(np.median(dist[:, 1]))


def smooth_neighbours(
    pred: np.ndarray,
    coords: np.ndarray,
    *,
    weight: float = 0.5,
    radius_factor: float = 1.5,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Predictions averaged with their spatial neighbours' predictions.

    Parameters
    ----------
    pred
        (N, G) predicted expression.
    coords
        (N, 2) spot or tile centres.
    weight
        Share of the neighbours' mean, in [0, 1] (0: unchanged).
    radius_factor
        Neighbours lie within this many grid pitches (1.5 takes the first ring of a square or hexagonal grid).
    groups
        (N,) sample of each spot: neighbours are looked for within the same sample only (None: one sample).

    Returns
    -------
    numpy.ndarray
        (N, G) float32 smoothed predictions.
    """
    check_weight(weight)
    if radius_factor <= 0:
        raise ConfigError(f"smoothing radius_factor must be positive, got {radius_factor}")
    pred = np.asarray(pred, dtype=np.float64)
    coords = np.asarray(coords, dtype=np.float64)
    groups = np.zeros(len(pred), dtype=np.int64) if groups is None else np.asarray(groups)
    out = pred.copy()
    if weight == 0.0:
        return out.astype(np.float32)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        pitch = grid_pitch(coords[rows])
        if pitch <= 0:
            continue
        tree = cKDTree(coords[rows])
        for local, neigh in enumerate(tree.query_ball_point(coords[rows], r=radius_factor * pitch)):
            others = [rows[j] for j in neigh if j != local]
            if others:
                out[rows[local]] = (1 - weight) * pred[rows[local]] + weight * pred[others].mean(axis=0)
    return out.astype(np.float32)
