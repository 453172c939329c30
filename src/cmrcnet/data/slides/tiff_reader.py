"""OME-TIFF and plain (pyramidal or not) TIFF through tifffile, read region by region with bounded memory.

A region is read without loading the whole level: memory-mapped when the data are uncompressed and contiguous;
else by decoding only the tiles/strips it touches (with a small LRU cache of decoded segments); else, for layouts
that rules out (separate colour planes, multi-page levels), through zarr (`series.aszarr`); a level that allows
none of these is read whole only when it is small (`MAX_WHOLE_LEVEL_BYTES`).
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

from cmrcnet.data.slides.base import SlideReader, parse_float, plausible_pixel_size
from cmrcnet.errors import ConfigError, InputFileError

logger = logging.getLogger(__name__)

# A level read whole (no piecewise access possible) may not be larger than this.
MAX_WHOLE_LEVEL_BYTES = 512 * 2**20
# Decoded TIFF segments kept for reuse by neighbouring tiles (per level).
SEGMENT_CACHE_BYTES = 16 * 2**20
_UNIT_TO_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "μm": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


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
            return plausible_pixel_size(um, path, "OME PhysicalSizeX"), "OME PhysicalSizeX"
    page = series.levels[0].keyframe
    description = str(getattr(page, "description", "") or "")
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description)  # Aperio SVS ImageDescription
    if match:
        um = plausible_pixel_size(parse_float(match.group(1)), path, "Aperio MPP")
        if um is not None:
            return um, "Aperio MPP"
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        per_unit = num / den if den else 0.0  # pixels per unit
        um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # 2: inch, 3: centimetre, 1: no unit
        if um_per_unit is not None and per_unit > 0:
            um = plausible_pixel_size(um_per_unit / per_unit, path, "TIFF XResolution")
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
            size = parse_float(el.get("PhysicalSizeX"))
            factor = _UNIT_TO_UM.get(el.get("PhysicalSizeXUnit", "µm"))
            return None if size is None or factor is None else size * factor
    return None
