"""The slide interface every back end implements, and the pixel-size checks they share."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from cmrcnet.constants import PAD_VALUE

logger = logging.getLogger(__name__)

# Pixel sizes outside this range are not from a microscope: TIFF writers default to 72 dpi (352.8 um/px).
PLAUSIBLE_PIXEL_SIZE_UM = (0.01, 100.0)


class SlideReader:
    """A slide opened for reading; use as a context manager or call `close()`.

    Attributes:
        path: the slide file.
        kind: the back end ("openslide", "tifffile" or "pillow").
        level_dimensions: (width, height) of every level, level 0 = full resolution.
        level_downsamples: full-resolution pixels per pixel of every level (1.0 for level 0), increasing.
        pixel_size_um: micrometres per full-resolution pixel from the file's metadata, or None.
        pixel_size_source: where `pixel_size_um` came from ("" when None).
    """

    kind = "base"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()
        self.pixel_size_um: float | None = None
        self.pixel_size_source: str = ""

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) at full resolution."""
        return self.level_dimensions[0]

    @property
    def n_levels(self) -> int:
        return len(self.level_dimensions)

    def readable_levels(self) -> list[int]:
        """Levels whose regions can be read with bounded memory (all of them for most files)."""
        return list(range(self.n_levels))

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest readable level that is not coarser than `downsample` (1 % tolerance), else the finest.

        Reading at a finer level and shrinking keeps all the detail the target resolution can hold; a coarser
        level would have to be enlarged.
        """
        levels = self.readable_levels()
        fine_enough = [lv for lv in levels if self.level_downsamples[lv] <= downsample * 1.01]
        if fine_enough:
            return max(fine_enough, key=lambda lv: self.level_downsamples[lv])
        best = min(levels, key=lambda lv: self.level_downsamples[lv])
        logger.warning(
            "%s: no readable level is as fine as downsample %.2f; level %d (downsample %.2f) is enlarged",
            self.path,
            downsample,
            best,
            self.level_downsamples[best],
        )
        return best

    def read_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) of `level` (in that level's pixels) as (h, w, 3) uint8 RGB.

        Parts outside the image are white.
        """
        if not 0 <= level < self.n_levels:
            raise ValueError(f"level {level} out of range (slide has {self.n_levels} levels)")
        if w < 1 or h < 1:
            raise ValueError(f"region size must be positive, got {w} x {h}")
        width, height = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h:
            return self._read(level, x0, y0, x1, y1)
        out = np.full((h, w, 3), PAD_VALUE, dtype=np.uint8)  # (h, w, 3)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read(level, x0, y0, x1, y1)
        return out

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels of a region inside the level as (y1 - y0, x1 - x0, 3) uint8."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path}, levels={self.level_dimensions})"


def parse_float(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def plausible_pixel_size(um: float | None, path: Path, source: str) -> float | None:
    if um is None or um <= 0:
        return None
    lo, hi = PLAUSIBLE_PIXEL_SIZE_UM
    if not lo <= um <= hi:
        logger.warning("%s: ignoring %s = %.4g um/px (not a microscope resolution)", path, source, um)
        return None
    return float(um)
