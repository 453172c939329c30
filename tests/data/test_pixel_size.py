"""Pixel size from the spot grid, and the user > metadata > estimate priority."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from cmrcnet.data.pixel_size import estimate_pixel_size, resolve_pixel_size
from cmrcnet.errors import CmrcnetError, ConfigError, InputFileError


def square_grid(
    n_x: int, n_y: int, pitch_px: float, *, jitter_px: float = 0.0, angle: float = 0.0, seed: int = 0
):
    """ST-like grid: array (x, y) and pixel centres, optionally rotated and jittered."""
    yy, xx = np.mgrid[1 : n_y + 1, 1 : n_x + 1]
    arr = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)  # (N, 2)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    px = 500.0 + arr @ rot.T * pitch_px  # (N, 2)
    px += np.random.default_rng(seed).normal(0.0, jitter_px, size=px.shape) if jitter_px else 0.0
    return px, arr


def hex_grid(n_rows: int, n_cols: int, pitch_px: float):
    """Visium-like grid: (array_row, array_col) with row + col even; horizontal neighbours 2 columns apart."""
    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    keep = (rows + cols) % 2 == 0
    arr = np.column_stack([rows[keep], cols[keep]]).astype(float)  # (N, 2) (row, col)
    px = np.column_stack([arr[:, 1] * pitch_px / 2.0, arr[:, 0] * pitch_px * math.sqrt(3.0) / 2.0])  # (x, y)
    return px + 100.0, arr


@pytest.mark.parametrize("with_array", [True, False])
def test_square_grid_st(with_array):
    px, arr = square_grid(6, 5, pitch_px=272.0, angle=0.1)
    um = estimate_pixel_size(px, pitch_um=200.0, array_coords=arr if with_array else None)
    assert um == pytest.approx(200.0 / 272.0, rel=1e-6)


def test_jittered_grid_is_not_biased_low():
    # Jitter makes the nearest of 4 neighbours closer than the pitch; first-shell averaging corrects it.
    px, arr = square_grid(30, 30, pitch_px=290.0, jitter_px=20.0, seed=1)
    assert estimate_pixel_size(px, pitch_um=200.0, array_coords=arr) == pytest.approx(200 / 290, rel=0.01)
    assert estimate_pixel_size(px, pitch_um=200.0) == pytest.approx(200 / 290, rel=0.02)


@pytest.mark.parametrize("with_array", [True, False])
def test_hex_grid_visium(with_array):
    px, arr = hex_grid(8, 16, pitch_px=138.0)
    um = estimate_pixel_size(px, pitch_um=100.0, array_coords=arr if with_array else None)
    assert um == pytest.approx(100.0 / 138.0, rel=1e-6)


def test_hex_grid_column_order_and_auto_detection():
    px, arr = hex_grid(8, 16, pitch_px=138.0)
    swapped = arr[:, ::-1]  # (col, row): the fit must find the doubled axis itself
    for grid in ("hex", "auto"):
        assert estimate_pixel_size(px, pitch_um=100.0, array_coords=swapped, grid=grid) == pytest.approx(
            100.0 / 138.0, rel=1e-6
        )


def test_sparse_hex_subset_uses_array_coordinates():
    # Scattered spots (no neighbours in pixel space) still give the pitch through their array coordinates.
    px, arr = hex_grid(40, 80, pitch_px=138.0)
    pick = np.random.default_rng(0).choice(len(px), size=60, replace=False)
    um = estimate_pixel_size(px[pick], pitch_um=100.0, array_coords=arr[pick], grid="hex")
    assert um == pytest.approx(100.0 / 138.0, rel=1e-6)


def test_too_few_spots():
    with pytest.raises(CmrcnetError, match="at least 2 spots"):
        estimate_pixel_size(np.array([[1.0, 2.0]]), pitch_um=200.0)


def test_coincident_spots():
    with pytest.raises(CmrcnetError, match="coincide"):
        estimate_pixel_size(np.zeros((3, 2)), pitch_um=200.0)


def test_resolve_priority(caplog, tmp_path):
    px, arr = square_grid(4, 4, pitch_px=100.0)
    common = {"coords_px": px, "pitch_um": 200.0, "array_coords": arr, "path": tmp_path / "x"}
    assert resolve_pixel_size(metadata_um=None, user_um=None, **common) == (pytest.approx(2.0), "estimated")
    assert resolve_pixel_size(metadata_um=0.5, user_um=None, **common) == (0.5, "metadata")
    assert resolve_pixel_size(metadata_um=float("nan"), user_um=None, **common)[1] == "estimated"
    assert resolve_pixel_size(metadata_um=None, user_um=None, estimate_um=0.7, **common) == (0.7, "estimated")
    with caplog.at_level(logging.WARNING):
        assert resolve_pixel_size(metadata_um=0.5, user_um=0.25, **common) == (0.25, "user")
    assert "differs from the file's metadata" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve_pixel_size(metadata_um=0.5, user_um=0.51, **common)
    assert caplog.text == ""


def test_resolve_rejects_bad_values(tmp_path):
    px, arr = square_grid(4, 4, pitch_px=100.0)
    common = {"coords_px": px, "array_coords": arr, "path": tmp_path / "meta.json"}
    with pytest.raises(ConfigError, match="pixel_size_um= must be a positive"):
        resolve_pixel_size(metadata_um=None, user_um=-1.0, pitch_um=200.0, **common)
    with pytest.raises(InputFileError, match=r"meta\.json: pixel size in the metadata"):
        resolve_pixel_size(metadata_um=0.0, user_um=None, pitch_um=200.0, **common)
    with pytest.raises(InputFileError, match="pass pixel_size_um="):
        resolve_pixel_size(metadata_um=None, user_um=None, pitch_um=None, **common)
    with pytest.raises(InputFileError, match=r"at least 2 spots.*pass pixel_size_um="):
        resolve_pixel_size(
            metadata_um=None, user_um=None, pitch_um=200.0, coords_px=px[:1], array_coords=None, path="x"
        )
