"""Spatial smoothing of predictions over neighbouring spots (cmrcnet.inference.smoothing)."""

from __future__ import annotations

import numpy as np
import pytest

from cmrcnet.errors import ConfigError
from cmrcnet.inference.smoothing import grid_pitch, smooth_neighbours


def _grid(n: int = 5, pitch: float = 290.0) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(n) * pitch, np.arange(n) * pitch)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)  # (n*n, 2)


def test_grid_pitch_is_the_median_nearest_neighbour_distance() -> None:
    assert grid_pitch(_grid()) == pytest.approx(290.0)
    assert grid_pitch(np.zeros((1, 2))) == 0.0


def test_a_spot_is_averaged_with_its_first_ring_only() -> None:
    coords = _grid()
    pred = np.zeros((25, 2))
    pred[12] = [4.0, 8.0]  # the centre spot
    out = smooth_neighbours(pred, coords, weight=0.5, radius_factor=1.5)
    np.testing.assert_allclose(out[12], [2.0, 4.0])  # half its own value, its 8 neighbours are 0
    ring = [6, 7, 8, 11, 13, 16, 17, 18]
    np.testing.assert_allclose(out[ring, 0], 0.5 * 4.0 / 8, rtol=1e-6)  # interior spots: 8 neighbours each
    assert np.all(out[[0, 4, 20, 24]] == 0)  # two pitches away: untouched
    assert out.dtype == np.float32


def test_samples_are_smoothed_separately_and_weight_zero_is_identity() -> None:
    coords = np.concatenate([_grid(3), _grid(3)])
    pred = np.concatenate([np.zeros((9, 1)), np.ones((9, 1))])
    out = smooth_neighbours(pred, coords, groups=np.repeat(["a", "b"], 9))
    np.testing.assert_allclose(out[:9], 0.0) and np.testing.assert_allclose(out[9:], 1.0)
    np.testing.assert_allclose(smooth_neighbours(pred, coords, weight=0.0), pred)
    with pytest.raises(ConfigError, match="must be in"):
        smooth_neighbours(pred, coords, weight=1.5)
