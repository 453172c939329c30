"""Open a slide image (pyramidal WSI, OME/plain TIFF, JPEG/PNG) behind one small interface.

Every reader exposes its pyramid levels (`level_dimensions`, `level_downsamples`), the pixel size from the file's
metadata when there is one, and `read_region(level, x, y, w, h)` -> (h, w, 3) uint8 RGB in the pixels of that
level. Regions reaching beyond the image are padded white (glass), like the training patches.

Back ends:
- OpenSlide (`pip install "cmrcnet[slide]"`: openslide-python with the openslide-bin wheel, no system library)
  for vendor formats (svs, ndpi, mrxs, scn, ...), and for TIFFs whose vendor OpenSlide recognises.
- tifffile for OME-TIFF and plain (pyramidal or not) TIFF. A region is read without loading the whole level:
  memory-mapped when the data are uncompressed and contiguous; else by decoding only the tiles/strips it touches
  (with a small LRU cache of decoded segments); else, for layouts that rules out (separate colour planes,
  multi-page levels), through zarr (`series.aszarr`); a level that allows none of these is read whole only when
  it is small (`MAX_WHOLE_LEVEL_BYTES`). Our segment reader comes before zarr because it measured both leaner and
  faster: a block-by-block pass over a 16k x 16k zlib-tiled level peaked 131 MB above the start through segments
  and 192 MB through zarr 3.1 (which kept 95 MB after the pass), 8.4 s against 12.0 s.
  JPEG-compressed TIFFs need `imagecodecs` for tifffile; without it `open_slide` falls back to OpenSlide.
- Pillow for JPEG and PNG. These formats cannot be read piecewise, so the image is decoded whole; for JPEG the
  decoder's DCT scaling gives cheap extra levels at 1/2, 1/4 and 1/8 resolution (`Image.draft`), so a model that
  needs a coarser resolution never holds the full-resolution image.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

from cmrcnet.data.slides.base import PLAUSIBLE_PIXEL_SIZE_UM, SlideReader
from cmrcnet.data.slides.openslide_reader import (
    OpenSlideReader,
    import_openslide,
    openslide_available,
    openslide_vendor,
)
from cmrcnet.data.slides.pillow_reader import PillowReader
from cmrcnet.data.slides.tiff_reader import MAX_WHOLE_LEVEL_BYTES, SEGMENT_CACHE_BYTES, TiffReader
from cmrcnet.errors import ConfigError, InputFileError, require_file

__all__ = [
    "JPEG_SUFFIXES",
    "MAX_WHOLE_LEVEL_BYTES",
    "OPENSLIDE_SUFFIXES",
    "PILLOW_SUFFIXES",
    "PLAUSIBLE_PIXEL_SIZE_UM",
    "READERS",
    "SEGMENT_CACHE_BYTES",
    "TIFF_SUFFIXES",
    "OpenSlideReader",
    "PillowReader",
    "SlideReader",
    "TiffReader",
    "import_openslide",
    "open_slide",
    "read_thumbnail",
    "read_tile",
    "resolve_slide_pixel_size",
]

logger = logging.getLogger(__name__)

READERS = ("auto", "openslide", "tifffile", "pillow")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff")  # also .ome.tif / .ome.tiff
PILLOW_SUFFIXES = (".jpg", ".jpeg", ".png")
JPEG_SUFFIXES = (".jpg", ".jpeg")


# --- opening ------------------------------------------------------------------------------------------------
def open_slide(path: str | Path, *, reader: str = "auto") -> SlideReader:
    """Open a slide with the back end its format needs (`reader="auto"`) or the one named.

    auto: vendor WSI suffixes -> OpenSlide; .tif/.tiff -> tifffile, unless OpenSlide is installed and recognises a
    vendor format in it (Philips, Ventana, ...); .jpg/.jpeg/.png -> Pillow.
    """
    path = require_file(path, "slide")
    if reader not in READERS:
        raise ConfigError(f"reader must be one of {READERS}, got {reader!r}")
    suffix = path.suffix.lower()
    auto = reader == "auto"
    if auto:
        if suffix in OPENSLIDE_SUFFIXES:
            reader = "openslide"
        elif suffix in TIFF_SUFFIXES:
            reader = "openslide" if openslide_vendor(path) else "tifffile"
        elif suffix in PILLOW_SUFFIXES:
            reader = "pillow"
        else:
            known = ", ".join(OPENSLIDE_SUFFIXES + TIFF_SUFFIXES + PILLOW_SUFFIXES)
            raise InputFileError(
                f"unsupported slide format {suffix or '(no suffix)'!r}; known: {known}", path=path
            )
    opened: SlideReader
    if reader == "openslide":
        opened = OpenSlideReader(path)
    elif reader == "tifffile":
        opened = _open_tiff(path, fallback=auto)
    else:
        opened = PillowReader(path)
    logger.info(
        "opened %s with %s: %d levels, %d x %d px, pixel size %s",
        path,
        opened.kind,
        opened.n_levels,
        *opened.dimensions,
        f"{opened.pixel_size_um:.4f} um ({opened.pixel_size_source})"
        if opened.pixel_size_um
        else "not recorded",
    )
    return opened


def _open_tiff(path: Path, *, fallback: bool) -> SlideReader:
    """tifffile, checked by decoding a pixel; with `fallback`, OpenSlide when tifffile cannot decode the file
    (e.g. JPEG tiles without imagecodecs) and OpenSlide is installed."""
    tiff = TiffReader(path)
    try:
        tiff.probe()
    except InputFileError as exc:
        tiff.close()
        if fallback and openslide_available():
            logger.info("%s: tifffile cannot decode it (%s); trying OpenSlide", path, exc.problem)
            try:
                return OpenSlideReader(path)
            except InputFileError:
                raise exc from None  # tifffile's message says what is missing
        raise
    return tiff


def read_thumbnail(
    reader: SlideReader, downsample: float, *, max_block_bytes: int = 16 * 2**20
) -> tuple[np.ndarray, float]:
    """A reduced copy of the whole slide, read block by block so memory stays bounded.

    The level is the coarsest not coarser than `downsample`; it is then reduced by the integer factor f nearest
    the remaining ratio (mean of f x f pixels), so thumbnail pixel (i, j) covers exactly the level pixels
    [i*f, (i+1)*f) x [j*f, (j+1)*f).

    Returns:
        (thumbnail (h, w, 3) uint8, its downsample: full-resolution pixels per thumbnail pixel).
    """
    level = reader.best_level_for_downsample(max(downsample, 1.0))
    level_ds = reader.level_downsamples[level]
    f = max(1, round(downsample / level_ds))  # the integer reduction nearest the target
    width, height = reader.level_dimensions[level]
    out_w, out_h = -(-width // f), -(-height // f)
    thumb = np.empty((out_h, out_w, 3), dtype=np.uint8)  # (h, w, 3)
    budget_px = max(f * f, max_block_bytes // 3)
    block_h = min(out_h * f, max(f, int(math.sqrt(budget_px)) // f * f))
    block_w = min(out_w * f, max(f, (budget_px // block_h) // f * f))
    for y in range(0, height, block_h):
        for x in range(0, width, block_w):
            h, w = min(block_h, height - y), min(block_w, width - x)
            block = reader.read_region(level, x, y, w, h)  # (h, w, 3)
            ph, pw = -(-h // f) * f - h, -(-w // f) * f - w
            if ph or pw:  # a partial block at the right/bottom edge: repeat the edge pixels
                block = np.pad(block, ((0, ph), (0, pw), (0, 0)), mode="edge")
            bh, bw = block.shape[0] // f, block.shape[1] // f
            sums = block.reshape(bh, f, bw, f, 3).sum(axis=(1, 3), dtype=np.uint32)  # (bh, bw, 3)
            thumb[y // f : y // f + bh, x // f : x // f + bw] = np.round(sums / (f * f)).astype(np.uint8)
    return thumb, level_ds * f


# --- tiles and pixel size (predict-slide and pretrain) ----------------------------------------------------
def read_tile(
    reader: SlideReader, level: int, cx: float, cy: float, fov_px: float, out_px: int
) -> np.ndarray:
    """The square tile of side `fov_px` (full-resolution pixels) centred at (cx, cy), as (out_px, out_px, 3) uint8.

    Read from `level` and resampled like training patches (SlideImage.read_patch): box filter when shrinking,
    bilinear when enlarging, sub-pixel box so tile positions are exact.
    """
    ds = reader.level_downsamples[level]
    side = fov_px / ds  # tile side in level pixels
    left, top = cx / ds - side / 2.0, cy / ds - side / 2.0
    x0, y0 = math.floor(left), math.floor(top)
    x1, y1 = math.ceil(left + side) + 1, math.ceil(top + side) + 1
    crop = reader.read_region(level, x0, y0, x1 - x0, y1 - y0)  # (y1 - y0, x1 - x0, 3)
    box = (left - x0, top - y0, left - x0 + side, top - y0 + side)
    resample = Image.Resampling.BOX if side > out_px else Image.Resampling.BILINEAR
    return np.asarray(
        Image.fromarray(crop).resize((out_px, out_px), resample=resample, box=box), dtype=np.uint8
    )


def resolve_slide_pixel_size(reader: SlideReader, user_um: float | None) -> tuple[float, str]:
    """The user's pixel size (warning when the metadata disagrees by more than 5 %), else the metadata's."""
    meta = reader.pixel_size_um
    if user_um is not None:
        if not (user_um > 0 and math.isfinite(user_um)):
            raise ConfigError(f"pixel size must be a positive number of micrometres, got {user_um}")
        if meta is not None and abs(user_um - meta) > 0.05 * meta:
            logger.warning(
                "%s: pixel_size_um=%.4g um differs from the slide's %s %.4g um; using pixel_size_um=",
                reader.path,
                user_um,
                reader.pixel_size_source,
                meta,
            )
        return float(user_um), "user"
    if meta is None:
        raise ConfigError(
            "the slide records no pixel size; give pixel_size_um= (micrometres per full-resolution pixel)",
            path=reader.path,
        )
    return float(meta), reader.pixel_size_source
