"""Latent maps of a synthetic slide on a coarse grid: tissue, program proportions, a hidden field, fibre warp."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

PROGRAMS = ("tumour", "immune", "stroma")  # latent tissue programs, in the order of obsm[PROGRAMS_KEY]
CELL_UM = 8.0  # resolution of the latent fields (micrometres per coarse cell)


@dataclass
class LatentFields:
    """Latent maps of one slide on the coarse grid (CELL_UM micrometres per cell)."""

    tissue: np.ndarray  # (hc, wc) signed level: > 0 on tissue
    programs: np.ndarray  # (3, hc, wc) program proportions, summing to 1
    hidden: np.ndarray  # (hc, wc) standardised field that genes see but the image does not
    fibre_warp: np.ndarray  # (hc, wc) fibre phase displacement in micrometres
    fibre_angle: float  # main collagen fibre direction (radians)


def coarse_shape(size: tuple[int, int], px_um: float) -> tuple[int, int]:
    """(rows, columns) of the coarse grid over an image of (width, height) = `size` pixels of `px_um`."""
    w, h = size
    return int(np.ceil(h * px_um / CELL_UM)), int(np.ceil(w * px_um / CELL_UM))


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale_um: float) -> np.ndarray:
    """White noise blurred to correlation length `scale_um`, standardised to mean 0 and std 1."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=scale_um / CELL_UM, mode="reflect")
    return (field - field.mean()) / max(float(field.std()), 1e-12)


def latent_fields(
    rng: np.random.Generator, size: tuple[int, int], px_um: float, program_scale_um: float
) -> LatentFields:
    """Random latent maps of one slide of (width, height) = `size` pixels of `px_um` micrometres."""
    shape = coarse_shape(size, px_um)
    hc, wc = shape
    # tissue: an ellipse with a smoothly irregular border, centred near the spot grid's centre
    yy, xx = np.mgrid[0:hc, 0:wc].astype(np.float64)
    cy, cx = (hc - 1) / 2 + rng.normal(0, 0.03 * hc), (wc - 1) / 2 + rng.normal(0, 0.03 * wc)
    ry, rx = rng.uniform(0.42, 0.5) * hc, rng.uniform(0.42, 0.5) * wc
    radius = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    tissue = 1.0 - radius - 0.12 * smooth_field(rng, shape, 90.0) - 0.04 * smooth_field(rng, shape, 25.0)
    # programs: softmax of independent smooth fields; immune aggregates are smaller than tumour regions
    scale = program_scale_um
    logits = np.stack(
        [
            2.2 * smooth_field(rng, shape, scale),
            2.2 * smooth_field(rng, shape, 0.6 * scale) - 0.3,
            2.2 * smooth_field(rng, shape, scale),
        ]
    )  # (3, hc, wc)
    logits -= logits.max(axis=0, keepdims=True)
    programs = np.exp(logits)
    programs /= programs.sum(axis=0, keepdims=True)
    hidden = smooth_field(rng, shape, scale)
    fibre_warp = 25.0 * smooth_field(rng, shape, 60.0)
    return LatentFields(tissue, programs, hidden, fibre_warp, float(rng.uniform(0, np.pi)))


def sample_coarse(field: np.ndarray, xy_px: np.ndarray, px_um: float) -> np.ndarray:
    """Nearest-cell lookup of a coarse field at pixel positions (N, 2) = (x, y); field may be (..., hc, wc)."""
    hc, wc = field.shape[-2:]
    col = np.clip((xy_px[:, 0] * px_um / CELL_UM).astype(np.int64), 0, wc - 1)
    row = np.clip((xy_px[:, 1] * px_um / CELL_UM).astype(np.int64), 0, hc - 1)
    return field[..., row, col]


def upsample(field: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a coarse 2-D field to (width, height) = `size`, as float32."""
    return np.array(Image.fromarray(field.astype(np.float32)).resize(size, Image.Resampling.BILINEAR))


# --- image ---------------------------------------------------------------------------------------------------
