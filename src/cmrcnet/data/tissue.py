"""Tissue detection on a low-resolution thumbnail: Otsu on saturation (or on brightness when the background is
black), then small objects and holes cleaned up.

Stained tissue is coloured (pink eosin, purple haematoxylin) while glass is white or grey, so the HSV saturation
separates the two under most scanners' white balance (the approach of CLAM, Lu et al., Nat Biomed Eng 2021, and
of many WSI pipelines). The Otsu threshold adapts to the stain intensity; a floor keeps an all-glass slide (whose
saturation histogram is only noise) from being split into "tissue" and "glass".

Some exports put the tissue on a black background. There the background has no saturation either, but a pale
section with a few strongly stained regions has a long saturation tail, and Otsu then separates the strong
regions from everything else, losing most of the tissue. When the thumbnail's border is dark, the tissue is instead
what is brighter than the background: Otsu on brightness (the largest RGB channel), with its own floor.

Loose stroma and fat are nearly as pale as glass: on her2st B4 the threshold alone found a lace of fibres, and 39 %
of the measured spots (all under tissue) had less than half of their tile on it. Gaps narrower than 60 um are
therefore bridged (closing with a disc, `close_um`) and holes up to 0.25 mm^2 filled (`min_hole_um2`): with that,
77 % of B4's spots and 97-99 % of C2-C6's have at least half of their 112 um square on tissue (61 % and 93-96 %
before), while the tissue fraction of the slide grew from 0.153 to 0.199 on B4 and by at most 0.010 on C2-C6
(thumbnails at 11 um/px; the degraded B4 copy on a black background is unchanged).

Exports and scans can hold objects that pass these thresholds but are not tissue: an annotation legend or an inset
(a miniature of the slide in a frame), a label, or marker-pen ink on the glass. Two rules drop them, each logged:
- a panel: an object that, with its holes filled, covers at least `panel_fill` of its bounding box (a rectangle;
  tissue outlines are irregular), whose pixels along the box edges are uniform (a plain frame or background, where
  a piece of tissue cut square, as some exports mask it, shows texture);
- ink: an object most of whose pixels have a colour no H&E stain gives (saturated yellow to green).
The largest object is never dropped (the main tissue).
The threshold is then computed again without the dropped objects (a white legend on a black background would
otherwise raise the brightness threshold and cut pale tissue). Limits: an object touching the tissue is part of it; a frame thinner than
about 2 thumbnail pixels is lost to the median filter; on white glass a white or black frame is not detected at
all, so a miniature of the slide there reads as a small piece of tissue.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_COVERAGE_CHUNK = 16384  # tiles per block in TissueMask.coverage


@dataclass
class TissueConfig:
    """Parameters of `detect_tissue` (areas in square micrometres, so they do not depend on the scan)."""

    min_saturation: float = 0.05  # floor of the Otsu threshold on saturation in [0, 1] (glass is below ~0.03)
    smooth_px: int = 3  # side of the median filter applied to the saturation image (1: none)
    min_object_um2: float = 10_000.0  # tissue pieces smaller than this (100 x 100 um) are dust: dropped
    min_hole_um2: float = 250_000.0  # holes inside tissue smaller than this (0.5 x 0.5 mm) are filled
    close_um: float = 30.0  # gaps narrower than twice this are bridged (morphological closing; 0: none)
    dark_border: float = 0.25  # a border median brightness below this (0-1) means a black background
    min_brightness: float = 0.2  # floor of the Otsu threshold on brightness on a black background
    panel_fill: float = 0.95  # an object filling this much of its bounding box is a rectangle: a legend/inset/label
    panel_min_px: int = 8  # ... when its box is at least this many thumbnail pixels on each side
    drop_non_tissue: bool = True  # drop panels and ink objects (module docstring)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class TissueMask:
    """A tissue mask at thumbnail resolution."""

    mask: np.ndarray  # (h, w) bool, True = tissue
    downsample: float  # full-resolution pixels per mask pixel
    threshold: float  # threshold applied to the feature (max of Otsu and the floor), tissue is above it
    otsu: float  # the Otsu threshold before the floor
    feature: str = "saturation"  # "saturation", or "brightness" on a black background
    left_out: str | None = None  # what was left out as not H&E tissue (legends, insets, pen ink), if anything

    @property
    def fraction(self) -> float:
        """Fraction of the slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def coverage(self, centers: np.ndarray, side_px: float, *, n: int = 5) -> np.ndarray:
        """Fraction of each square (centre (x, y), side `side_px`, full-resolution pixels) that is tissue.

        Sampled at an n x n grid of points inside each square; points outside the image count as glass.
        Computed in chunks of `_COVERAGE_CHUNK` squares so memory does not grow with the number of tiles.
        """
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        if len(centers) > _COVERAGE_CHUNK:
            return np.concatenate(
                [
                    self.coverage(centers[i : i + _COVERAGE_CHUNK], side_px, n=n)
                    for i in range(0, len(centers), _COVERAGE_CHUNK)
                ]
            )
        offsets = ((np.arange(n) + 0.5) / n - 0.5) * side_px  # (n,)
        ox, oy = np.meshgrid(offsets, offsets)  # (n, n) each
        px = (centers[:, :1] + ox.ravel()[None]) / self.downsample  # (N, n*n) mask columns
        py = (centers[:, 1:] + oy.ravel()[None]) / self.downsample  # (N, n*n) mask rows
        col, row = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
        h, w = self.mask.shape
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        hit = np.zeros(col.shape, dtype=bool)
        hit[inside] = self.mask[row[inside], col[inside]]
        return hit.mean(axis=1)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of (h, w, 3) uint8 RGB as uint8 0..255 (255 = 1.0); 0 for black.

    Kept in uint8 (one byte per pixel) so a large thumbnail costs little memory.
    """
    hi, lo = rgb.max(axis=2), rgb.min(axis=2)  # (h, w) uint8 each
    spread = (hi - lo).astype(np.uint16) * 255  # (h, w)
    return (spread // np.maximum(hi, 1)).astype(np.uint8)


def _otsu_index(hist: np.ndarray) -> int:
    """Last bin of the lower class by Otsu's criterion (max between-class variance) on a histogram.

    The criterion is flat across an empty gap between two classes: the middle of that plateau is taken.
    """
    p = hist.astype(np.float64) / max(float(hist.sum()), 1.0)
    idx = np.arange(len(p), dtype=np.float64)
    w0 = np.cumsum(p)  # weight of the lower class with the cut after bin i
    m0 = np.cumsum(p * idx)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    top = float(between.max())
    if top <= 0:  # a single populated bin: nothing to separate
        return int(np.argmax(hist))
    plateau = np.flatnonzero(between >= top)
    return (int(plateau[0]) + int(plateau[-1])) // 2


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: values above it form the upper class."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return 0.0
    hist, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    return float(edges[_otsu_index(hist) + 1])


def detect_tissue(
    thumb: np.ndarray,
    downsample: float,
    pixel_size_um: float,
    config: TissueConfig | None = None,
) -> TissueMask:
    """Tissue mask of a slide thumbnail.

    Args:
        thumb: (h, w, 3) uint8 RGB thumbnail.
        downsample: full-resolution pixels per thumbnail pixel.
        pixel_size_um: micrometres per full-resolution pixel (to turn the config's areas into pixels).
        config: thresholds; default `TissueConfig()`.
    """
    cfg = config or TissueConfig()
    if dark_background(thumb, cfg.dark_border):
        feature, name, floor = thumb.max(axis=2), "brightness", cfg.min_brightness  # (h, w) uint8
    else:
        feature, name, floor = saturation(thumb), "saturation", cfg.min_saturation
    if cfg.smooth_px > 1:
        feature = ndimage.median_filter(feature, size=cfg.smooth_px, mode="nearest")
    um2_per_px = (downsample * pixel_size_um) ** 2
    raw, otsu, cut = _threshold(feature, floor)
    left_out = None
    if cfg.drop_non_tissue:
        # on the mask before dust removal, so that a thin frame still encloses its inset
        dropped, counts = non_tissue_objects(raw, thumb, cfg, min_px=cfg.min_object_um2 / um2_per_px)
        if dropped.any():
            raw, otsu, cut = _threshold(feature, floor, ignore=dropped)
            raw &= ~dropped
            left_out = "left out {} ({:.1f}% of the slide) as not H&E tissue (predict-slide --keep-all-objects keeps them)".format(
                ", ".join(f"{n} {kind}" for kind, n in counts.items() if n), 100.0 * float(dropped.mean())
            )
            logger.warning("tissue: %s", left_out)
    mask = _remove_small(raw, cfg.min_object_um2 / um2_per_px)
    mask = close_gaps(mask, cfg.close_um / (downsample * pixel_size_um))
    mask = ~_remove_small(~mask, cfg.min_hole_um2 / um2_per_px, keep_border=True)
    threshold, otsu_f = (cut + 0.5) / 255.0, (otsu + 0.5) / 255.0
    logger.info(
        "tissue: %s threshold %.3f (Otsu %.3f)%s, %.1f%% of the slide",
        name,
        threshold,
        otsu_f,
        " on a black background" if name == "brightness" else "",
        100.0 * float(mask.mean()),
    )
    return TissueMask(mask, float(downsample), float(threshold), float(otsu_f), name, left_out)


def _threshold(feature: np.ndarray, floor: float, *, ignore: np.ndarray | None = None) -> tuple[np.ndarray, int, int]:
    """(feature above max(Otsu, floor), Otsu bin, cut bin); `ignore`: pixels left out of the Otsu histogram
    (objects already known not to be tissue)."""
    values = feature if ignore is None else feature[~ignore]
    otsu = _otsu_index(np.bincount(values.ravel(), minlength=256))  # in units of 1/255
    cut = max(otsu, math.floor(floor * 255))
    return feature > cut, otsu, cut


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """(h, w) float32 HSV hue in degrees [0, 360) of uint8 RGB (0 for grey pixels)."""
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hi, lo = x.max(axis=2), x.min(axis=2)
    spread = np.maximum(hi - lo, 1e-6)
    hue = np.where(hi == r, (g - b) / spread % 6, np.where(hi == g, (b - r) / spread + 2, (r - g) / spread + 4))
    return np.where(hi - lo > 0, hue * 60.0, 0.0).astype(np.float32)


def off_stain(rgb: np.ndarray) -> np.ndarray:
    """(h, w) bool: pixels of a colour H&E does not give: saturation at least 0.3 and hue from 45 to 160 degrees
    (yellow to green: marker pens and annotation colours). Eosin is pink-red and haematoxylin blue-purple; hues
    of cyan and teal (160-200 degrees) are left alone, as a stain shifted by another scanner can reach them."""
    hue = hue_degrees(rgb)
    return (hue >= 45.0) & (hue <= 160.0) & (saturation(rgb) >= round(0.3 * 255))


def non_tissue_objects(
    mask: np.ndarray, thumb: np.ndarray, cfg: TissueConfig, *, min_px: float = 0.0
) -> tuple[np.ndarray, dict[str, int]]:
    """(pixels of the objects of `mask` that are panels or ink (module docstring), {"panel(s)": n, "ink
    object(s)": n}). Objects are 8-connected with their holes filled, so a framed inset drops with its contents;
    objects smaller than `min_px` with their holes filled are dust, left to the dust removal (not counted here).
    The largest object is never dropped, so some tissue always remains."""
    none = np.zeros_like(mask)
    filled = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(filled, structure=_EIGHT_CONNECTED)
    if n < 2:
        return none, {}
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n + 1)
    tissue_px = np.bincount(flat, weights=mask.ravel(), minlength=n + 1)
    ink_px = np.bincount(flat, weights=(mask & off_stain(thumb)).ravel(), minlength=n + 1)
    largest = int(np.argmax(sizes[1:])) + 1
    kind = np.zeros(n + 1, dtype=np.int8)  # 0 keep, 1 panel, 2 ink
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
        if sizes[i] < min_px or i == largest:
            continue
        if min(h, w) >= cfg.panel_min_px and sizes[i] >= cfg.panel_fill * h * w and _plain_border(thumb[box]):
            kind[i] = 1
        elif ink_px[i] > 0.5 * tissue_px[i]:
            kind[i] = 2
    return kind[labels] > 0, {"panel(s)": int((kind == 1).sum()), "ink object(s)": int((kind == 2).sum())}


def close_gaps(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Morphological closing of `mask` with a disc of `radius_px` (rounded; nothing below 1), the image padded
    so that tissue at the image border is not eroded."""
    r = round(radius_px)
    if r < 1 or not mask.any():
        return mask
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = xx * xx + yy * yy <= r * r
    closed = ndimage.binary_closing(np.pad(mask, r), structure=disc)
    return closed[r:-r, r:-r]


def _plain_border(region: np.ndarray, tolerance: int = 12, share: float = 0.9) -> bool:
    """Whether each edge of an (h, w, 3) region is plain, on its outermost line of pixels or on the next one in: at
    least `share` of the line within `tolerance` of its median on every channel (the frame or background of a
    panel; tissue has texture). Edges are judged one by one and on two lines, since in a thumbnail an edge can
    be blended with the background (by its own fraction of a pixel) and a frame can be a single pixel wide."""
    h, w = region.shape[:2]

    def plain(line: np.ndarray) -> bool:
        line = line[1:-1].astype(np.int16)  # (n, 3) without the corners
        return len(line) > 0 and bool((np.abs(line - np.median(line, axis=0)).max(axis=1) <= tolerance).mean() >= share)

    depths = (0, 1) if min(h, w) > 4 else (0,)
    sides = [lambda d: region[d, d : w - d], lambda d: region[h - 1 - d, d : w - d],
             lambda d: region[d : h - d, d], lambda d: region[d : h - d, w - 1 - d]]  # fmt: skip
    return all(any(plain(side(d)) for d in depths) for side in sides)


def dark_background(thumb: np.ndarray, dark_border: float = 0.25) -> bool:
    """Whether the thumbnail's border (its outermost pixels) is mostly black: median brightness below
    `dark_border` (0-1)."""
    border = np.concatenate([thumb[0], thumb[-1], thumb[:, 0], thumb[:, -1]])  # (n, 3)
    return bool(np.median(border.max(axis=1)) < dark_border * 255)


def _remove_small(mask: np.ndarray, min_px: float, *, keep_border: bool = False) -> np.ndarray:
    """`mask` without its 8-connected components smaller than `min_px` pixels.

    keep_border: components touching the image border are always kept (for holes: glass around the tissue is
    not a hole).
    """
    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)  # (n + 1,), 0 = background
    keep = sizes >= min_px
    keep[0] = False
    if keep_border:
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        keep[border[border > 0]] = True
    return keep[labels]
