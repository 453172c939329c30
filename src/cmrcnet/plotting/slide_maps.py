"""Whole-slide maps: per-tile values (predicted expression, tumour score, masks) drawn over the slide thumbnail.

Tiles lie on a regular grid (centre of tile (row, col) = origin + (col, row) * step, full-resolution pixels), so a
map is an (n_rows, n_cols) raster with one cell per grid position. Each figure shows two panels on the same extent:
the thumbnail untouched (with a contour of the high-value region where asked) and the map over a faint grey copy
of it, so the tissue is never hidden under the colours.
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
    alpha: float = 0.9,
    categories: Sequence[str] | None = None,
    contour_level: float | None = None,
    contour_quantile: float | None = None,
) -> None:
    """Draw per-tile `values` beside the thumbnail and write a PNG.

    Two panels on the same extent: left the slide thumbnail as it is (optionally with a contour of the
    high-value region), right the map over a faint grey copy of the thumbnail. The tissue stays fully visible.

    Args:
        thumb: (h, w, 3) uint8 slide thumbnail.
        thumb_downsample: full-resolution pixels per thumbnail pixel.
        rows, cols: (N,) grid position of each tile; values: (N,) the value drawn for it.
        origin_px: centre of tile (0, 0) in full-resolution pixels (same in x and y).
        step_px: centre-to-centre distance of grid positions in full-resolution pixels.
        n_rows, n_cols: grid size.
        alpha: opacity of the map in the right panel.
        categories: draw `values` (0/1) as two labelled categories instead of a colour scale; the first is
            transparent (e.g. ["not tumour", "tumour"]). The second is outlined on the thumbnail.
        contour_level: draw the contour `values == contour_level` on both panels.
        contour_quantile: draw the contour at this quantile of the finite values (e.g. 0.8: the top 20 % of
            tiles); ignored when `contour_level` is given.
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
    panel_h = max(2.5, 0.5 * _FIG_IN * h / max(w, 1))
    fig, (ax_img, ax_map) = plt.subplots(
        1,
        2,
        figsize=(_FIG_IN * 1.6 + 1.2, panel_h * 1.6 + 0.6),
        sharex=True,
        sharey=True,
        constrained_layout=True,
    )
    ax_img.imshow(thumb, interpolation="antialiased")
    grey = thumb.astype(np.float32).mean(axis=2)  # (h, w) the tissue, faint, under the map
    ax_map.imshow(grey, cmap="gray", vmin=0, vmax=255, alpha=0.35, interpolation="antialiased")
    if categories is not None:
        shown = np.where(grid > 0.5, 1.0, np.nan)  # only the second category is coloured
        colour = "#d7301f"
        ax_map.imshow(
            shown, extent=extent, cmap=ListedColormap([colour]), alpha=alpha, interpolation="nearest"
        )
        from matplotlib.patches import Patch

        n_pos = int(np.nansum(grid > 0.5))
        ax_map.legend(
            handles=[Patch(color=colour, alpha=alpha, label=f"{categories[1]} ({n_pos} tiles)")],
            loc="upper right",
            fontsize=8,
        )
        level = 0.5
    else:
        finite = grid[np.isfinite(grid)]
        lo = float(finite.min()) if vmin is None and finite.size else vmin
        hi = float(finite.max()) if vmax is None and finite.size else vmax
        if lo is not None and hi is not None and hi <= lo:
            hi = lo + 1e-6
        im = ax_map.imshow(
            grid, extent=extent, cmap=cmap, vmin=lo, vmax=hi, alpha=alpha, interpolation="nearest"
        )
        fig.colorbar(im, ax=ax_map, shrink=0.8, label=label)
        level = contour_level
        if level is None and contour_quantile is not None and finite.size:
            level = float(np.quantile(finite, contour_quantile))
    if level is not None:
        for ax, colour in ((ax_img, "#00b7ff"), (ax_map, "black")):
            _draw_contour(ax, grid, extent, level, colour)
    if level is None:
        ax_img.set_title("slide", fontsize=9)
    elif categories is not None:
        ax_img.set_title(f"slide; line: outline of {categories[1]}", fontsize=9)
    elif contour_level is None:
        top = f"top {100 * (1 - contour_quantile):.0f}% of tiles"
        ax_img.set_title(f"slide; line: {top} (value >= {level:.3g})", fontsize=9)
    else:
        ax_img.set_title(f"slide; line: value = {level:.3g}", fontsize=9)
    for ax in (ax_img, ax_map):
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)  # image convention: y grows downwards
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _draw_contour(ax, grid: np.ndarray, extent: tuple[float, ...], level: float, colour: str) -> None:
    """The line `grid == level` through the tile centres; tiles outside the tissue count as below the level."""
    n_rows, n_cols = grid.shape
    finite = grid[np.isfinite(grid)]
    if n_rows < 2 or n_cols < 2 or not finite.size or not (finite.min() < level <= finite.max()):
        return  # no line to draw: one-row grids, or every tile on one side of the level
    below = min(float(finite.min()), level) - 1.0
    filled = np.where(np.isfinite(grid), grid, below)  # (n_rows, n_cols)
    left, right, bottom, top = extent
    x = left + (np.arange(n_cols) + 0.5) * (right - left) / n_cols  # tile centres, thumbnail pixels
    y = top + (np.arange(n_rows) + 0.5) * (bottom - top) / n_rows
    ax.contour(x, y, filled, levels=[level], colors=[colour], linewidths=1.4)


def save_mask_png(mask: np.ndarray, path: str | Path) -> None:
    """A boolean mask as an 8-bit greyscale PNG (255 = True), written atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp, format="PNG")


def save_rgb_png(rgb: np.ndarray, path: str | Path) -> None:
    """An (h, w, 3) uint8 image as PNG, written atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(tmp, format="PNG")
