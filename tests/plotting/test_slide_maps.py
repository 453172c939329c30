"""Whole-slide maps: the thumbnail beside the map, and the contour of the high-value region."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cmrcnet.plotting.slide_maps import plot_tile_map

PINK = (235, 150, 190)  # the tissue colour of the drawn thumbnail


def _tissue_pixels(rgb: np.ndarray) -> int:
    """Pixels of about the thumbnail's tissue colour (pink: red and blue high, green lower)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return int(((abs(r - PINK[0]) < 25) & (abs(g - PINK[1]) < 25) & (abs(b - PINK[2]) < 25)).sum())


def _coloured_pixels(rgb: np.ndarray) -> int:
    """Clearly coloured (not white, grey or black) pixels."""
    x = rgb.astype(int)
    return int(((x.max(axis=2) - x.min(axis=2)) > 60).sum())


def test_map_is_drawn_beside_the_untouched_thumbnail(tmp_path: Path) -> None:
    thumb = np.full((80, 120, 3), 245, dtype=np.uint8)  # white glass
    thumb[20:60, 30:90] = PINK  # a pink block of tissue
    rows, cols = np.divmod(np.arange(4 * 6), 6)  # 4 x 6 tiles of 10 px covering the block
    values = cols.astype(float)  # rising to the right
    path = tmp_path / "map.png"
    plot_tile_map(
        thumb, 1.0, rows + 2, cols + 3, values, path, origin_px=5.0, step_px=10.0, n_rows=8, n_cols=12,
        title="t", cmap="RdBu_r", contour_quantile=0.8,
    )  # fmt: skip
    assert path.is_file()
    with Image.open(path) as im:
        img = np.asarray(im.convert("RGB"))
    w = img.shape[1]
    left, right = img[:, : w // 2], img[:, w // 2 :]
    # the left panel shows the tissue as it is; the right one shows the map (coloured), not the pink tissue
    assert _tissue_pixels(left) > 2000
    assert _tissue_pixels(right) < _tissue_pixels(left) // 10
    assert _coloured_pixels(right) > 2000
    # the high-value contour is drawn on the thumbnail: light-blue line pixels in the left panel
    r, g, b = (left[..., i].astype(int) for i in range(3))
    assert ((r < 80) & (g > 120) & (b > 200)).sum() > 20
