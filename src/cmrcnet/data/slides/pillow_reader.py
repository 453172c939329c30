"""JPEG and PNG through Pillow (decoded whole; JPEG gets cheap coarser levels through DCT scaling)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from cmrcnet.data.image import large_images_allowed
from cmrcnet.data.slides.base import SlideReader
from cmrcnet.errors import InputFileError

logger = logging.getLogger(__name__)

_JPEG_SCALES = (1, 2, 4, 8)  # libjpeg's DCT scaling factors used by Image.draft


class PillowReader(SlideReader):
    """JPEG and PNG through Pillow: decoded whole, one level in memory at a time; no pixel-size metadata.

    JPEG gets levels at 1/2, 1/4 and 1/8 through DCT scaling. JFIF/PNG densities are not used as a pixel size:
    they are almost always a writer's default (72 dpi), not the scanner's resolution.
    """

    kind = "pillow"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            with large_images_allowed(), Image.open(path) as im:
                width, height = im.size
                is_jpeg = im.format == "JPEG"
        except Exception as exc:  # truncated or corrupt files raise OSError, ValueError, SyntaxError, ...
            raise InputFileError(f"cannot read image ({type(exc).__name__}: {exc})", path=path) from exc
        self._scales = _JPEG_SCALES if is_jpeg else (1,)
        self.level_dimensions = tuple((-(-width // s), -(-height // s)) for s in self._scales)
        self.level_downsamples = tuple((width / w + height / h) / 2.0 for w, h in self.level_dimensions)
        self._cached: tuple[int, np.ndarray] | None = None

    def _level_array(self, level: int) -> np.ndarray:
        if self._cached is not None and self._cached[0] == level:
            return self._cached[1]
        self._cached = None  # free the previous level before decoding the next
        width, height = self.level_dimensions[0]
        scale = self._scales[level]
        try:
            with large_images_allowed(), Image.open(self.path) as im:
                if scale > 1:
                    im.draft("RGB", (width // scale, height // scale))
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)  # (h, w, 3)
        except Exception as exc:
            raise InputFileError(
                f"cannot decode image ({type(exc).__name__}: {exc})", path=self.path
            ) from exc
        if (arr.shape[1], arr.shape[0]) != self.level_dimensions[level]:
            raise InputFileError(
                f"decoded level {level} is {arr.shape[1]} x {arr.shape[0]} px, "
                f"expected {self.level_dimensions[level]}",
                path=self.path,
            )
        logger.debug("%s: decoded level %d (%d x %d)", self.path, level, arr.shape[1], arr.shape[0])
        self._cached = (level, arr)
        return arr

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return np.ascontiguousarray(self._level_array(level)[y0:y1, x0:x1])

    def close(self) -> None:
        self._cached = None
