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
import re
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cmrcnet.constants import PAD_VALUE
from cmrcnet.data.image import large_images_allowed
from cmrcnet.errors import ConfigError, InputFileError, require_file

logger = logging.getLogger(__name__)

READERS = ("auto", "openslide", "tifffile", "pillow")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff")  # also .ome.tif / .ome.tiff
PILLOW_SUFFIXES = (".jpg", ".jpeg", ".png")
JPEG_SUFFIXES = (".jpg", ".jpeg")

# A level read whole (no piecewise access possible) may not be larger than this.
MAX_WHOLE_LEVEL_BYTES = 512 * 2**20
# Decoded TIFF segments kept for reuse by neighbouring tiles (per level).
SEGMENT_CACHE_BYTES = 16 * 2**20
# Pixel sizes outside this range are not from a microscope: TIFF writers default to 72 dpi (352.8 um/px).
PLAUSIBLE_PIXEL_SIZE_UM = (0.01, 100.0)
_JPEG_SCALES = (1, 2, 4, 8)  # libjpeg's DCT scaling factors used by Image.draft
_UNIT_TO_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "μm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
_OPENSLIDE_HINT = 'reading this slide needs OpenSlide: pip install "cmrcnet[slide]"'


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


# --- OpenSlide ----------------------------------------------------------------------------------------------
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
        self.pixel_size_um = _plausible(_to_float(mpp), path, "openslide.mpp-x")
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


# --- tifffile -----------------------------------------------------------------------------------------------
def _import_zarr() -> Any:
    """zarr when installed, else None (regions are then decoded tile by tile)."""
    try:
        import zarr
    except ImportError:
        return None
    return zarr


class _LevelAxes:
    """Where rows, columns and samples are in a tifffile level's array, and how to index a region."""

    def __init__(self, axes: str, shape: tuple[int, ...], path: Path) -> None:
        self.axes, self.shape = axes, tuple(int(s) for s in shape)
        if "Y" not in axes or "X" not in axes:
            raise InputFileError(f"TIFF image has no Y/X axes (axes {axes!r}, shape {shape})", path=path)
        channel = [i for i, a in enumerate(axes) if a in "SC" and self.shape[i] > 1]
        other = [i for i, a in enumerate(axes) if a not in "YXSC" and self.shape[i] > 1]
        if len(channel) > 1 or other:
            raise InputFileError(
                f"unsupported TIFF layout: axes {axes!r}, shape {shape}; expected an RGB (or grey) image",
                path=path,
            )
        self.channel = channel[0] if channel else None
        self.height, self.width = self.shape[axes.index("Y")], self.shape[axes.index("X")]

    def index(self, x0: int, y0: int, x1: int, y1: int) -> tuple:
        out: list[Any] = []
        for i, a in enumerate(self.axes):
            if a == "Y":
                out.append(slice(y0, y1))
            elif a == "X":
                out.append(slice(x0, x1))
            elif i == self.channel:
                out.append(slice(None))
            else:
                out.append(0)
        return tuple(out)

    def to_hwc(self, arr: np.ndarray) -> np.ndarray:
        """A region indexed with `index` -> (h, w, c)."""
        kept = [a for i, a in enumerate(self.axes) if a in "YX" or i == self.channel]
        if self.channel is None:
            return arr.transpose(kept.index("Y"), kept.index("X"))[..., None]  # (h, w, 1)
        c = "S" if self.axes[self.channel] == "S" else "C"
        return arr.transpose(kept.index("Y"), kept.index("X"), kept.index(c))  # (h, w, c)


class _SegmentLevel:
    """Region reads from a tiled or stripped TIFF page by decoding only the segments (tiles/strips) it touches.

    Decoded segments are kept in a small LRU cache (`SEGMENT_CACHE_BYTES`): neighbouring tiles, read in row-major
    order, share segments.
    """

    def __init__(self, tif: Any, page: Any) -> None:
        self.fh, self.page = tif.filehandle, page
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = int(page.rowsperstrip), int(page.imagewidth)
        self.seg_h = min(self.seg_h, int(page.imagelength))
        self.n_across = math.ceil(int(page.imagewidth) / self.seg_w)
        self.samples = int(page.samplesperpixel)
        self._cache: OrderedDict[int, tuple[np.ndarray | None, int, int]] = OrderedDict()
        self._cache_bytes = 0

    def _segment(self, index: int) -> tuple[np.ndarray | None, int, int]:
        """(decoded segment (length, width, samples) or None when empty, its top row, its left column)."""
        hit = self._cache.get(index)
        if hit is not None:
            self._cache.move_to_end(index)
            return hit
        page = self.page
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        data = None
        if count:
            with self.fh.lock:
                self.fh.seek(offset)
                data = self.fh.read(count)
        seg, pos, _shape = page.decode(data, index, jpegtables=page.jpegtables)
        entry = (None if seg is None else seg[0], int(pos[2]), int(pos[3]))  # seg[0]: drop the depth axis
        self._cache[index] = entry
        self._cache_bytes += 0 if entry[0] is None else entry[0].nbytes
        while self._cache_bytes > SEGMENT_CACHE_BYTES and len(self._cache) > 1:
            old, _, _ = self._cache.popitem(last=False)[1]
            self._cache_bytes -= 0 if old is None else old.nbytes
        return entry

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        out = np.zeros((y1 - y0, x1 - x0, self.samples), dtype=self.page.dtype)  # (h, w, samples)
        for ty in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
            for tx in range(x0 // self.seg_w, (x1 - 1) // self.seg_w + 1):
                seg, sy, sx = self._segment(ty * self.n_across + tx)
                if seg is None:  # an empty segment holds no data: leave zeros
                    continue
                iy0, iy1 = max(y0, sy), min(y1, sy + seg.shape[0])
                ix0, ix1 = max(x0, sx), min(x1, sx + seg.shape[1])
                if iy1 > iy0 and ix1 > ix0:
                    out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = seg[
                        iy0 - sy : iy1 - sy, ix0 - sx : ix1 - sx
                    ]
        return out


class TiffReader(SlideReader):
    """OME-TIFF and plain TIFF (pyramid levels from `TiffFile.series[0].levels`) through tifffile."""

    kind = "tifffile"

    def __init__(self, path: Path, *, use_zarr: bool = True) -> None:
        super().__init__(path)
        import tifffile

        try:
            self._tif = tifffile.TiffFile(path)
            self._series = self._tif.series[0]
            levels = list(self._series.levels)
            self._axes = [_LevelAxes(lv.axes, lv.shape, path) for lv in levels]
        except InputFileError:
            self._close_quietly()
            raise
        except Exception as exc:  # tifffile raises many types for corrupt files
            self._close_quietly()
            raise InputFileError(f"cannot read TIFF ({type(exc).__name__}: {exc})", path=path) from exc
        self._levels = levels
        self._zarr = _import_zarr() if use_zarr else None
        self._access: dict[int, tuple[str, Any]] = {}
        self.level_dimensions = tuple((ax.width, ax.height) for ax in self._axes)
        w0, h0 = self.level_dimensions[0]
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2.0 for w, h in self.level_dimensions)
        um, source = _tiff_pixel_size(self._tif, self._series, path)
        self.pixel_size_um, self.pixel_size_source = um, source

    def _close_quietly(self) -> None:
        tif = getattr(self, "_tif", None)
        if tif is not None:
            tif.close()

    def readable_levels(self) -> list[int]:
        return [lv for lv in range(self.n_levels) if self._method(lv) != "too-large"]

    def access_method(self, level: int) -> str:
        """How regions of `level` are read: "memmap", "zarr", "segments", "whole" or "too-large"."""
        return self._method(level)

    def _method(self, level: int) -> str:
        if level not in self._access:
            self._access[level] = self._open_level(level)
        return self._access[level][0]

    def _open_level(self, level: int) -> tuple[str, Any]:
        import tifffile

        lv = self._levels[level]
        pages = [p for p in lv.pages if p is not None]
        page = pages[0] if pages else lv.keyframe
        if len(pages) == 1 and getattr(page, "is_memmappable", False):
            try:
                return "memmap", tifffile.memmap(self.path, series=0, level=level, mode="r")
            except (ValueError, OSError) as exc:
                logger.debug("%s level %d not memory-mappable (%s)", self.path, level, exc)
        if len(pages) == 1 and isinstance(page, tifffile.TiffPage) and page.planarconfig == 1:
            return "segments", _SegmentLevel(self._tif, page)
        if self._zarr is not None:  # other layouts (separate colour planes, multi-page levels)
            try:
                return "zarr", self._zarr.open(self._series.aszarr(level=level), mode="r")
            except Exception as exc:  # zarr/tifffile version mismatches raise assorted errors
                logger.debug("%s level %d: zarr access failed (%s)", self.path, level, exc)
        nbytes = int(np.prod(lv.shape)) * lv.dtype.itemsize
        if nbytes <= MAX_WHOLE_LEVEL_BYTES:
            return "whole", None
        logger.warning(
            "%s: level %d (%d x %d) cannot be read piecewise (install zarr) and is too large to load whole",
            self.path,
            level,
            *self.level_dimensions[level],
        )
        return "too-large", None

    def probe(self) -> None:
        """Decode one pixel of the coarsest level, so an undecodable file fails at opening, not mid-slide."""
        level = self.n_levels - 1
        self.read_region(level, 0, 0, 1, 1)

    def _read(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        try:
            return self._read_unchecked(level, x0, y0, x1, y1)
        except (InputFileError, ConfigError):
            raise
        except Exception as exc:  # codecs raise assorted types (ValueError for a missing codec, ...)
            hint = (
                "; JPEG-compressed TIFFs need `pip install imagecodecs` (or OpenSlide)"
                if "imagecodecs" in str(exc)
                else ""
            )
            raise InputFileError(
                f"cannot decode TIFF level {level} ({type(exc).__name__}: {exc}){hint}", path=self.path
            ) from exc

    def _read_unchecked(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        method = self._method(level)
        ax = self._axes[level]
        if method in ("memmap", "zarr"):
            arr = ax.to_hwc(np.asarray(self._access[level][1][ax.index(x0, y0, x1, y1)]))
        elif method == "segments":
            arr = self._access[level][1].read(x0, y0, x1, y1)
        elif method == "whole":
            whole = self._levels[level].asarray()  # small by construction (MAX_WHOLE_LEVEL_BYTES)
            self._access[level] = ("memory", whole)
            arr = ax.to_hwc(whole[ax.index(x0, y0, x1, y1)])
        elif method == "memory":
            arr = ax.to_hwc(self._access[level][1][ax.index(x0, y0, x1, y1)])
        else:
            raise ConfigError(
                f"level {level} ({self.level_dimensions[level][0]} x {self.level_dimensions[level][1]} px) "
                "cannot be read piecewise; pip install zarr",
                path=self.path,
            )
        return _hwc_to_rgb8(arr)

    def close(self) -> None:
        self._access.clear()
        self._tif.close()


def _hwc_to_rgb8(arr: np.ndarray) -> np.ndarray:
    """(h, w, c) of any integer or float type -> (h, w, 3) uint8 (grey expanded, alpha dropped)."""
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)  # (h, w, 3)
    arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.integer):
            arr = np.round(arr.astype(np.float32) * (255.0 / np.iinfo(arr.dtype).max))
        else:  # floats: [0, 1] by convention
            arr = np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _tiff_pixel_size(tif: Any, series: Any, path: Path) -> tuple[float | None, str]:
    """Micrometres per full-resolution pixel from OME PhysicalSizeX, an Aperio MPP, or the resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        um = _ome_physical_size_x(tif.ome_metadata)
        if um is not None:
            return _plausible(um, path, "OME PhysicalSizeX"), "OME PhysicalSizeX"
    page = series.levels[0].keyframe
    description = str(getattr(page, "description", "") or "")
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description)  # Aperio SVS ImageDescription
    if match:
        um = _plausible(_to_float(match.group(1)), path, "Aperio MPP")
        if um is not None:
            return um, "Aperio MPP"
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit = num / den if den else 0.0  # pixels per unit
        um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # 2: inch, 3: centimetre, 1: no unit
        if um_per_unit is not None and per_unit > 0:
            um = _plausible(um_per_unit / per_unit, path, "TIFF XResolution")
            if um is not None:
                return um, "TIFF XResolution"
    return None, ""


def _ome_physical_size_x(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels" and el.get("PhysicalSizeX"):
            size = _to_float(el.get("PhysicalSizeX"))
            factor = _UNIT_TO_UM.get(el.get("PhysicalSizeXUnit", "µm"))
            return None if size is None or factor is None else size * factor
    return None


# --- Pillow -------------------------------------------------------------------------------------------------
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
            reader = "openslide" if _openslide_vendor(path) else "tifffile"
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
        if fallback and _openslide_available():
            logger.info("%s: tifffile cannot decode it (%s); trying OpenSlide", path, exc.problem)
            try:
                return OpenSlideReader(path)
            except InputFileError:
                raise exc from None  # tifffile's message says what is missing
        raise
    return tiff


def _openslide_available() -> bool:
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _openslide_vendor(path: Path) -> str | None:
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


# --- helpers ------------------------------------------------------------------------------------------------
def _to_float(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _plausible(um: float | None, path: Path, source: str) -> float | None:
    if um is None or um <= 0:
        return None
    lo, hi = PLAUSIBLE_PIXEL_SIZE_UM
    if not lo <= um <= hi:
        logger.warning("%s: ignoring %s = %.4g um/px (not a microscope resolution)", path, source, um)
        return None
    return float(um)


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
                "%s: --pixel-size %.4g um differs from the slide's %s %.4g um; using --pixel-size",
                reader.path,
                user_um,
                reader.pixel_size_source,
                meta,
            )
        return float(user_um), "user"
    if meta is None:
        raise ConfigError(
            "the slide records no pixel size; give --pixel-size UM (micrometres per full-resolution pixel)",
            path=reader.path,
        )
    return float(meta), reader.pixel_size_source
