"""Lazy access to an H&E image (JPEG, PNG or TIFF) in full-resolution pixel coordinates.

Spot coordinates always refer to the full-resolution image. Some formats only ship a downscaled image
(10x Visium `tissue_hires_image.png` with `tissue_hires_scalef`); `scale` maps full-resolution pixels to
pixels of the stored image so callers never need to care.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cmrcnet.constants import PAD_VALUE
from cmrcnet.errors import InputFileError, require_file

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
# Whole H&E sections are routinely 10^8-10^9 pixels: far above PIL's decompression-bomb guard, which we
# lift only while opening an image the user named.
_MAX_PIXELS = 4_000_000_000


@contextlib.contextmanager
def large_images_allowed() -> Iterator[None]:
    """Lift PIL's decompression-bomb limit (to 4e9 pixels) while opening an image the user named."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = _MAX_PIXELS
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


@dataclass
class SlideImage:
    """An RGB image on disk, read lazily and cached as a uint8 array (H, W, 3).

    Attributes:
        path: the image file.
        scale: stored-image pixels per full-resolution pixel (1.0 for a full-resolution image).
    """

    path: Path
    scale: float = 1.0
    _array: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.scale > 0:
            raise InputFileError(f"image scale must be positive, got {self.scale}", path=self.path)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the stored image in its own pixels, read from the header only."""
        if self._array is not None:
            return self._array.shape[1], self._array.shape[0]
        return read_image_size(self.path)

    @property
    def full_res_size(self) -> tuple[float, float]:
        """(width, height) in full-resolution pixels."""
        w, h = self.size
        return w / self.scale, h / self.scale

    @classmethod
    def from_array(cls, array: np.ndarray, path: str | Path, scale: float = 1.0) -> SlideImage:
        """An image already in memory (e.g. generated); `path` is only a label for messages."""
        img = cls(Path(path), scale=scale)
        img._array = _to_rgb_uint8(np.asarray(array), Path(path))
        return img

    def array(self) -> np.ndarray:
        """The whole image as (H, W, 3) uint8, loaded once."""
        if self._array is None:
            self._array = load_rgb(self.path)
        return self._array

    def release(self) -> None:
        """Drop the cached pixels (the next access reads the file again)."""
        self._array = None

    def read_patch(self, cx: float, cy: float, fov_px: float, out_px: int) -> tuple[np.ndarray, float]:
        """Read a square patch centred on full-resolution pixel (cx, cy).

        Args:
            cx, cy: centre in full-resolution pixels (x = column, y = row).
            fov_px: side of the square in full-resolution pixels.
            out_px: side of the returned patch in pixels (resampled).

        Returns:
            (patch (out_px, out_px, 3) uint8, fraction of the patch area outside the image, padded white).
        """
        img = self.array()
        h, w = img.shape[:2]
        side = fov_px * self.scale  # side in stored-image pixels
        left = cx * self.scale - side / 2.0
        top = cy * self.scale - side / 2.0
        # integer crop that contains the float box, padded with white where it leaves the image
        x0, y0 = int(np.floor(left)), int(np.floor(top))
        x1, y1 = int(np.ceil(left + side)) + 1, int(np.ceil(top + side)) + 1
        crop = np.full((y1 - y0, x1 - x0, 3), PAD_VALUE, dtype=np.uint8)  # (h_crop, w_crop, 3)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if sx1 > sx0 and sy1 > sy0:
            crop[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
        inside_w = max(0.0, min(left + side, w) - max(left, 0.0))
        inside_h = max(0.0, min(top + side, h) - max(top, 0.0))
        outside = 1.0 - (inside_w * inside_h) / (side * side)
        box = (left - x0, top - y0, left - x0 + side, top - y0 + side)
        # BOX filter = area averaging when shrinking, bilinear-like when enlarging: no aliasing either way
        resample = Image.Resampling.BOX if side > out_px else Image.Resampling.BILINEAR
        patch = Image.fromarray(crop).resize((out_px, out_px), resample=resample, box=box)
        outside = 0.0 if outside < 1e-9 else outside  # float round-off of a patch fully inside
        return np.asarray(patch, dtype=np.uint8), float(outside)


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file without decoding its pixels."""
    path = require_file(path, "image")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.series[0].levels[0] if tif.series else tif.pages[0]
                shape = page.shape
        except Exception as exc:  # tifffile raises many types for corrupt files
            raise InputFileError(f"cannot read TIFF header ({exc})", path=path) from exc
        h, w = _tiff_hw(shape, path)
        return w, h
    try:
        with large_images_allowed(), Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise InputFileError(f"cannot read image ({exc})", path=path) from exc


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file into an (H, W, 3) uint8 array (alpha dropped, grey expanded)."""
    path = require_file(path, "image")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path, level=0) if _is_pyramid(path) else tifffile.imread(path)
            arr = _to_rgb_uint8(np.asarray(arr), path)
        else:
            with large_images_allowed(), Image.open(path) as im:
                im.load()
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except InputFileError:
        raise
    except Exception as exc:  # truncated or corrupt files raise OSError, ValueError, SyntaxError, ...
        raise InputFileError(f"cannot decode image ({type(exc).__name__}: {exc})", path=path) from exc
    logger.debug("loaded %s: %s", path, arr.shape)
    return arr


def _is_pyramid(path: Path) -> bool:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return bool(tif.series) and len(tif.series[0].levels) > 1


def _tiff_hw(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3 and shape[-1] in (3, 4):  # (H, W, C)
        return shape[0], shape[1]
    if len(shape) == 3 and shape[0] in (3, 4):  # (C, H, W) planar
        return shape[1], shape[2]
    raise InputFileError(f"unsupported TIFF layout {shape}; expected (H, W, 3)", path=path)


def _to_rgb_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # (C, H, W) -> (H, W, C)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)  # (H, W) -> (H, W, 3)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise InputFileError(f"unsupported image layout {arr.shape}; expected RGB", path=path)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer):
            arr = (arr.astype(np.float64) / np.iinfo(arr.dtype).max * 255.0).round()
        else:
            arr = np.clip(arr, 0.0, 1.0) * 255.0 if float(np.nanmax(arr)) <= 1.0 else np.clip(arr, 0, 255)
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)
