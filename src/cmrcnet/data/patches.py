"""Cut fixed-field-of-view patches around spot centres.

A patch always covers the same physical area (`fov_um`, default 112 um as in HEST-1k: 224 px at 0.5 um/px),
resampled to `patch_px` pixels, so slides scanned at different resolutions give comparable patches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from cmrcnet.data.image import SlideImage
from cmrcnet.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class PatchSet:
    """Patches of one sample, aligned with its spots.

    Attributes:
        img: (N, S, S, 3) uint8 patches.
        barcodes: N spot ids, in the same order.
        centers: (N, 2) float spot centres (x, y) in full-resolution pixels.
        outside_fraction: (N,) fraction of each patch that lay outside the image and was padded white.
        fov_um: physical side of every patch in micrometres.
        fov_px: side of every patch in full-resolution pixels (fov_um / pixel size).
    """

    img: np.ndarray
    barcodes: list[str]
    centers: np.ndarray
    outside_fraction: np.ndarray
    fov_um: float
    fov_px: float

    @property
    def n_padded(self) -> int:
        return int((self.outside_fraction > 0).sum())


def extract_patches(
    image: SlideImage,
    centers: np.ndarray,
    barcodes: Iterable[str],
    *,
    pixel_size_um: float,
    fov_um: float,
    patch_px: int,
    progress: bool = True,
    desc: str = "patches",
) -> PatchSet:
    """Extract one square patch per spot centre.

    Args:
        image: the slide image (full-resolution coordinates; the image's own `scale` is applied).
        centers: (N, 2) spot centres (x, y) in full-resolution pixels.
        barcodes: N spot ids.
        pixel_size_um: micrometres per full-resolution pixel.
        fov_um: physical side of the patch.
        patch_px: output side in pixels.
    """
    if not fov_um > 0:
        raise ConfigError(f"field of view must be positive, got {fov_um} um")
    if patch_px < 8:
        raise ConfigError(f"patch size must be at least 8 px, got {patch_px}")
    if not pixel_size_um > 0:
        raise ConfigError(f"pixel size must be positive, got {pixel_size_um} um/px")
    centers = np.asarray(centers, dtype=np.float64)
    barcodes = [str(b) for b in barcodes]
    fov_px = fov_um / pixel_size_um
    n = len(centers)
    out = np.empty((n, patch_px, patch_px, 3), dtype=np.uint8)  # (N, S, S, 3)
    outside = np.zeros(n, dtype=np.float32)
    for i in tqdm(range(n), desc=desc, unit="spot", disable=not progress, leave=False):
        out[i], outside[i] = image.read_patch(centers[i, 0], centers[i, 1], fov_px, patch_px)
    if (outside > 0).any():
        logger.warning(
            "%d of %d patches reach beyond the image and were padded white (max %.1f%% of a patch)",
            int((outside > 0).sum()),
            n,
            100 * float(outside.max()),
        )
    return PatchSet(out, barcodes, centers, outside, float(fov_um), float(fov_px))
