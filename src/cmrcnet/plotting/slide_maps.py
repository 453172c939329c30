"""Whole-slide maps: per-tile values (predicted expression, tumour score, masks) drawn over the slide thumbnail.

Tiles lie on a regular grid (centre of tile (row, col) = origin + (col, row) * step, full-resolution pixels), so a
map is an (n_rows, n_cols) raster with one cell per grid position, drawn semi-transparently over the thumbnail.
With overlapping tiles (step < tile side) each cell shows the tile centred in it. matplotlib's Agg backend is
chosen inside each function (never at import); every PNG is written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cmrcnet.atomic import atomic_path
from cmrcnet.plotting.maps import _pyplot, _save

_FIG_IN = 6.5  # width of a slide map figure, inches
_MAX_DRAWN_PX = 800  # a larger thumbnail is reduced by an integer factor before drawing


def tile_raster(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int, n_cols: int
) -> np.ndarray:
    """(n_rows, n_cols) float raster with `values` at (rows, cols) and NaN elsewhere (no tile / not tissue)."""
    grid = np.full((n_rows, n_cols), np.nan, dtype=np.float64)
    grid[np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)] = np.asarray(
        values, dtype=np.float64
    )
    return grid


def plot_tile_map(
    thumb: np.ndarray,
    thumb_downsample: float,
    rows: np.ndarray,
    cols: np.ndarray,
    values: np.ndarray,
    path: str | Path,
    *,
    origin_px: float,
    step_px: float,
    n_rows: int,
    n_cols: int,
    title: str,
    label: str = "",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.7,
    categories: Sequence[str] | None = None,
) -> None:
    """Draw per-tile `values` over the thumbnail and write a PNG.

    Args:
        thumb: (h, w, 3) uint8 slide thumbnail.
        thumb_downsample: full-resolution pixels per thumbnail pixel.
        rows, cols: (N,) grid position of each tile; values: (N,) the value drawn for it.
        origin_px: centre of tile (0, 0) in full-resolution pixels (same in x and y).
        step_px: centre-to-centre distance of grid positions in full-resolution pixels.
        n_rows, n_cols: grid size.
        categories: draw `values` (0/1) as two labelled categories instead of a colour scale; the first is
            transparent (e.g. ["not tumour", "tumour"]).
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    grid = tile_raster(rows, cols, values, n_rows, n_cols)
    factor = -(-max(thumb.shape[:2]) // _MAX_DRAWN_PX)
    if factor > 1:  # a figure shows ~800 px: drawing a larger thumbnail only costs memory
        thumb = np.asarray(Image.fromarray(thumb).reduce(factor))
        thumb_downsample *= factor
    h, w = thumb.shape[:2]
    half = step_px / 2.0
    extent = (
        (origin_px - half) / thumb_downsample,
        (origin_px + (n_cols - 1) * step_px + half) / thumb_downsample,
        (origin_px + (n_rows - 1) * step_px + half) / thumb_downsample,
        (origin_px - half) / thumb_downsample,
    )  # left, right, bottom, top in thumbnail pixels
    fig_h = max(2.5, _FIG_IN * h / max(w, 1))
    fig, ax = plt.subplots(figsize=(_FIG_IN + 1.2, fig_h + 0.6), constrained_layout=True)
    ax.imshow(thumb, interpolation="antialiased")
    if categories is not None:
        shown = np.where(grid > 0.5, 1.0, np.nan)  # only the second category is coloured
        ax.imshow(
            shown, extent=extent, cmap=ListedColormap(["#d7301f"]), alpha=alpha, interpolation="nearest"
        )
        from matplotlib.patches import Patch

        n_pos = int(np.nansum(grid > 0.5))
        ax.legend(
            handles=[Patch(color="#d7301f", alpha=alpha, label=f"{categories[1]} ({n_pos} tiles)")],
            loc="upper right",
            fontsize=8,
        )
    else:
        finite = grid[np.isfinite(grid)]
        lo = float(finite.min()) if vmin is None and finite.size else vmin
        hi = float(finite.max()) if vmax is None and finite.size else vmax
        if lo is not None and hi is not None and hi <= lo:
            hi = lo + 1e-6
        im = ax.imshow(grid, extent=extent, cmap=cmap, vmin=lo, vmax=hi, alpha=alpha, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8, label=label)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)  # image convention: y grows downwards
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def save_mask_png(mask: np.ndarray, path: str | Path) -> None:
    """A boolean mask as an 8-bit greyscale PNG (255 = True), written atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp, format="PNG")


def save_rgb_png(rgb: np.ndarray, path: str | Path) -> None:
    """An (h, w, 3) uint8 image as PNG, written atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(tmp, format="PNG")
