"""Pixel size (micrometres per full-resolution pixel) from metadata, the user, or the spot grid.

Every spot-based technology prints spots on a grid of known centre-to-centre pitch (`SPOT_PITCH_UM`), so the
pixel distance between neighbouring spot centres gives the pixel size without any image metadata.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.spatial import cKDTree

from cmrcnet.data.sample import PixelSizeSource
from cmrcnet.errors import CmrcnetError, ConfigError, InputFileError

logger = logging.getLogger(__name__)

GridKind = Literal["square", "hex", "auto"]

# A user value and a metadata value further apart than this are probably not the same image.
_DISAGREE_REL = 0.05
# Neighbours per spot used for the grid fit; more only adds redundant, longer pairs.
_N_NEIGHBOURS = 6
# First-shell neighbours lie within this factor of the nearest-neighbour distance (the next shell: 1.41x).
_NN_SHELL = 1.3


def estimate_pixel_size(
    coords_px: np.ndarray,
    *,
    pitch_um: float,
    array_coords: np.ndarray | None = None,
    grid: GridKind = "auto",
) -> float:
    """Estimate micrometres per pixel from spot centres and the technology's centre-to-centre pitch.

    Args:
        coords_px: (N, 2) spot centres in full-resolution pixels (x, y).
        pitch_um: centre-to-centre distance of neighbouring spots in micrometres (ST 200, Visium 100).
        array_coords: optional (N, 2) integer array (grid) coordinates. Legacy ST: (x, y), neighbours one unit
            apart. Visium: (array_row, array_col) on a hexagonal grid where horizontal neighbours are two
            columns apart and diagonal neighbours one row and one column apart.
        grid: "square" (ST), "hex" (Visium) or "auto" (hex when every row + col has the same parity, as the
            Visium doubled-column layout guarantees).

    Returns:
        Micrometres per full-resolution pixel.

    With array coordinates every spot is paired with its nearest grid neighbours and the ratio of pixel distance
    to grid distance (in pitches) is taken; the median of these ratios is robust to a few misplaced spots and
    works on sparse spot sets. Without them, the median distance to the first shell of neighbours is taken as
    the pitch (this needs a mostly contiguous spot set).
    """
    xy = np.asarray(coords_px, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise CmrcnetError(f"spot coordinates must be (N, 2) to estimate the pixel size, got {xy.shape}")
    xy = xy[:, :2]
    if len(xy) < 2:
        raise CmrcnetError(f"need at least 2 spots to estimate the pixel size from the grid, got {len(xy)}")
    if not np.all(np.isfinite(xy)):
        raise CmrcnetError("spot coordinates contain NaN or infinite values")
    if not (math.isfinite(pitch_um) and pitch_um > 0):
        raise CmrcnetError(f"spot pitch must be a positive number of micrometres, got {pitch_um}")

    if array_coords is None:
        pitch_px = _median_nn_distance(xy)
        method = "median first-shell neighbour distance"
    else:
        arr = np.asarray(array_coords, dtype=np.float64)
        if arr.shape[0] != len(xy) or arr.ndim != 2 or arr.shape[1] < 2:
            raise CmrcnetError(f"array coordinates must be (N, 2) with N = {len(xy)}, got {arr.shape}")
        arr = arr[:, :2]
        kind = _grid_kind(arr) if grid == "auto" else grid
        if kind == "hex":
            # The row/col order is a convention: try both and keep the one whose ratios agree best.
            fits = [_grid_fit(xy, _hex_to_pitch_units(arr, col_axis=axis)) for axis in (1, 0)]
            pitch_px, _spread = min(fits, key=lambda f: f[1])
        elif kind == "square":
            pitch_px, _spread = _grid_fit(xy, arr)
        else:
            raise CmrcnetError(f"grid must be 'square', 'hex' or 'auto', got {grid!r}")
        method = f"{kind} grid fit on array coordinates"
    if not (math.isfinite(pitch_px) and pitch_px > 0):
        raise CmrcnetError("cannot estimate the pixel size: spot centres coincide")
    um_per_px = pitch_um / pitch_px
    logger.debug("pixel size %.4f um/px (%s, pitch %.1f px = %.0f um)", um_per_px, method, pitch_px, pitch_um)
    return float(um_per_px)


def resolve_pixel_size(
    *,
    metadata_um: float | None,
    user_um: float | None,
    coords_px: np.ndarray,
    pitch_um: float | None,
    array_coords: np.ndarray | None,
    path: str | Path,
    grid: GridKind = "auto",
    estimate_um: float | None = None,
) -> tuple[float, PixelSizeSource]:
    """Choose the pixel size: the user's value, else the file's metadata, else an estimate.

    Args:
        metadata_um: pixel size recorded in the input files (None or NaN when absent).
        user_um: pixel size given by the user (`pixel_size_um`); overrides the metadata.
        coords_px, array_coords, grid: spot centres and grid for `estimate_pixel_size`.
        pitch_um: the technology's spot pitch, or None when unknown (then an estimate is impossible).
        path: the file named in error messages.
        estimate_um: an estimate the reader already made another way (e.g. from a recorded spot diameter);
            used instead of the grid estimate.

    Returns:
        (micrometres per pixel, "user" | "metadata" | "estimated").
    """
    if user_um is not None:
        if not _positive_finite(user_um):
            raise ConfigError(
                f"pixel_size_um= must be a positive number of micrometres per pixel, got {user_um}"
            )
        user_um = float(user_um)
    if metadata_um is not None and _is_nan(metadata_um):
        metadata_um = None  # HEST and pandas-written JSON store "unknown" as NaN
    if metadata_um is not None:
        if not _positive_finite(metadata_um):
            raise InputFileError(
                f"pixel size in the metadata is not a positive number: {metadata_um}", path=path
            )
        metadata_um = float(metadata_um)

    if user_um is not None:
        if metadata_um is not None and abs(user_um - metadata_um) > _DISAGREE_REL * metadata_um:
            logger.warning(
                "%s: pixel_size_um=%.4f um/px differs from the file's metadata (%.4f um/px) by more than %d%%; "
                "using pixel_size_um=",
                path,
                user_um,
                metadata_um,
                round(100 * _DISAGREE_REL),
            )
        return user_um, "user"
    if metadata_um is not None:
        return metadata_um, "metadata"
    if estimate_um is not None:
        if not _positive_finite(estimate_um):
            raise InputFileError(f"estimated pixel size is not a positive number: {estimate_um}", path=path)
        return float(estimate_um), "estimated"
    if pitch_um is None:
        raise InputFileError(
            "no pixel size in the file and the technology (hence the spot pitch) is unknown; pass pixel_size_um= "
            "(micrometres per full-resolution pixel) or the technology",
            path=path,
        )
    try:
        um = estimate_pixel_size(coords_px, pitch_um=pitch_um, array_coords=array_coords, grid=grid)
    except CmrcnetError as exc:
        raise InputFileError(f"{exc.problem}; pass pixel_size_um=", path=path) from exc
    logger.info("%s: estimated pixel size %.4f um/px from the spot grid (pitch %.0f um)", path, um, pitch_um)
    return um, "estimated"


def _positive_finite(value: float) -> bool:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and v > 0


def _is_nan(value: object) -> bool:
    try:
        return math.isnan(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _median_nn_distance(xy: np.ndarray) -> float:
    """Typical neighbour distance: median of the distances to the nearest few spots that lie within
    `_NN_SHELL` times the median nearest-neighbour distance.

    The plain nearest-neighbour median is biased low when centres are jittered (the minimum of 4-6 noisy
    distances): on her2st, whose centres scatter by about 20 px, it gives 272 px where the grid pitch is 290 px.
    Averaging over the whole first shell of neighbours (4 on a square grid, 6 on a hexagonal one; diagonals at
    1.41x and second hexagonal neighbours at 1.73x are excluded) removes most of that bias.
    """
    k = min(_N_NEIGHBOURS, len(xy) - 1)
    dist, _ = cKDTree(xy).query(xy, k=k + 1)  # (N, k + 1): self, then nearest others
    dist = dist[:, 1:]
    nearest = dist[:, 0][dist[:, 0] > 0]  # duplicated centres carry no distance information
    if not nearest.size:
        return float("nan")
    d0 = float(np.median(nearest))
    shell = dist[(dist > 0) & (dist <= _NN_SHELL * d0)]
    return float(np.median(shell))


def _grid_kind(arr: np.ndarray) -> Literal["square", "hex"]:
    """Visium's hexagonal grid doubles the column index, so row + col always has one parity."""
    if len(arr) >= 3 and np.allclose(arr, np.round(arr)):
        parity = np.round(arr[:, 0] + arr[:, 1]).astype(np.int64) % 2
        if np.all(parity == parity[0]):
            return "hex"
    return "square"


def _hex_to_pitch_units(arr: np.ndarray, *, col_axis: int) -> np.ndarray:
    """Map hexagonal (row, col) indices to positions in units of the pitch (neighbours 1 apart)."""
    col = arr[:, col_axis]
    row = arr[:, 1 - col_axis]
    return np.column_stack([col / 2.0, row * math.sqrt(3.0) / 2.0])  # (N, 2)


def _grid_fit(xy: np.ndarray, grid_units: np.ndarray) -> tuple[float, float]:
    """(pixels per pitch, relative spread) from pairs of grid neighbours; grid_units are in pitches."""
    k = min(_N_NEIGHBOURS + 1, len(xy))
    dist, idx = cKDTree(grid_units).query(grid_units, k=k)  # (N, k), column 0 is the spot itself
    i = np.repeat(np.arange(len(xy)), k - 1)  # (N * (k-1),)
    j = idx[:, 1:].ravel()
    d_grid = dist[:, 1:].ravel()
    keep = d_grid > 0  # spots sharing an array position (duplicates) carry no scale information
    if not keep.any():
        return float("nan"), float("inf")
    d_px = np.linalg.norm(xy[i[keep]] - xy[j[keep]], axis=1)
    ratio = d_px / d_grid[keep]
    med = float(np.median(ratio))
    spread = float(np.median(np.abs(ratio - med)) / med) if med > 0 else float("inf")
    return med, spread
