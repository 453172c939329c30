"""Vendor WSI formats (svs, ndpi, mrxs, scn, ...) through OpenSlide (`pip install "cmrcnet[slide]"`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cmrcnet.constants import PAD_VALUE
from cmrcnet.data.slides.base import SlideReader, parse_float, plausible_pixel_size
from cmrcnet.errors import ConfigError, InputFileError

_OPENSLIDE_HINT = 'reading this slide needs OpenSlide: pip install "cmrcnet[slide]"'


def import_openslide(path: Path | None = None) -> Any:
    """The openslide module, or a ConfigError telling how to install it."""
    try:
        import openslide
    except (ImportError, OSError) as exc:  # OSError: the Python package without a native library
        raise ConfigError(
            f"{_OPENSLIDE_HINT} (openslide-python + openslide-bin; {type(exc).__name__}: {exc})", path=path
        ) from exc
    return openslide


class OpenSlideReader(SlideReader):
    """Vendor WSI formats through OpenSlide."""

    kind = "openslide"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        openslide = import_openslide(path)
        try:
            self._slide = openslide.OpenSlide(str(path))
        except Exception as exc:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
            raise InputFileError(
                f"OpenSlide cannot read this slide ({type(exc).__name__}: {exc})", path=path
            ) from exc
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        mpp = self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        self.pixel_size_um = plausible_pixel_size(parse_float(mpp), path, "openslide.mpp-x")
        self.pixel_size_source = "openslide.mpp-x" if self.pixel_size_um else ""

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        # OpenSlide takes the location in level-0 pixels and the size in pixels of the level
        region = self._slide.read_region((round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0))
        canvas = Image.new("RGBA", region.size, (PAD_VALUE, PAD_VALUE, PAD_VALUE, 255))
        canvas.alpha_composite(region)  # transparent = no data (outside the scanned area) -> white
        return np.asarray(canvas.convert("RGB"), dtype=np.uint8)

    def close(self) -> None:
        self._slide.close()


def openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def openslide_vendor(path: Path) -> str | None:
    """OpenSlide's vendor for a TIFF when OpenSlide is installed and it is not a generic TIFF, else None."""
    try:
        import openslide
    except (ImportError, OSError):
        return None
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # an unreadable file is reported by the reader that opens it
        return None
    return vendor if vendor not in (None, "generic-tiff") else None
