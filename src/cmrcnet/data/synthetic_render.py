"""The H&E-like image of a synthetic slide: tissue, collagen fibres, nuclei per program, Beer-Lambert stains."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cmrcnet.data.synthetic_fields import PROGRAMS, LatentFields, sample_coarse, upsample

# optical density per unit stain in (R, G, B): hematoxylin (Ruifrok & Johnston 2001) and a pinker eosin
_HEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_EOSIN_OD = np.array([0.10, 0.85, 0.40], dtype=np.float32)
_GLASS_OD = 0.035  # clean glass is almost, not quite, white

# per program: nuclei per square micrometre, semi-axis range (um), aspect range, optical density, chromatin
_NUCLEI = {
    "tumour": {"density": 1 / 90, "radius": (4.5, 6.5), "aspect": (1.0, 1.5), "od": 0.75, "vesicular": True},
    "immune": {"density": 1 / 45, "radius": (2.6, 3.4), "aspect": (1.0, 1.15), "od": 1.7, "vesicular": False},
    "stroma": {"density": 1 / 700, "radius": (6.0, 9.0), "aspect": (3.0, 4.5), "od": 1.1, "vesicular": False},
}
_N_KERNELS = 24  # precomputed nucleus shapes per program


def _nucleus_kernels(
    rng: np.random.Generator, program: str, px_um: float, angles: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Small soft-edged ellipses as (dy, dx, optical density) of their non-zero pixels, one per angle."""
    spec = _NUCLEI[program]
    half = int(np.ceil(spec["radius"][1] / px_um)) + 2
    dy, dx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    kernels = []
    for angle in angles:
        a = rng.uniform(*spec["radius"]) / px_um  # major semi-axis (px)
        b = a / rng.uniform(*spec["aspect"])  # minor semi-axis (px)
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2)  # 1 on the nuclear membrane
        edge = np.clip((1.0 - r) * b / 0.8 + 0.5, 0.0, 1.0)  # about 1 px soft edge
        value = spec["od"] * edge
        if spec["vesicular"]:  # pale centre, dark rim and a nucleolus
            value *= 0.65 + 0.5 * np.clip(r, 0, 1) ** 2
            ny, nx = rng.uniform(-0.3, 0.3, size=2) * b
            value += 0.9 * np.exp(-((dy - ny) ** 2 + (dx - nx) ** 2) / (2 * (0.6 / px_um) ** 2)) * edge
        keep = value > 0.01
        kernels.append((dy[keep].astype(np.int64), dx[keep].astype(np.int64), value[keep].astype(np.float32)))
    return kernels


def _place_nuclei(
    rng: np.random.Generator,
    weight: np.ndarray,
    density_um2: float,
    size: tuple[int, int],
    px_um: float,
) -> np.ndarray:
    """Inhomogeneous Poisson points (N, 2) = (x, y) in pixels with intensity density * weight (by thinning)."""
    w, h = size
    area_um2 = w * h * px_um**2
    xy = rng.uniform((0, 0), (w, h), size=(rng.poisson(density_um2 * area_um2), 2))
    accept = rng.uniform(size=len(xy)) < np.clip(sample_coarse(weight, xy, px_um), 0.0, 1.0)
    return xy[accept]


def _stamp(
    canvas: np.ndarray,
    xy: np.ndarray,
    kernel_index: np.ndarray,
    scale: np.ndarray,
    kernels: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    """Add kernels[kernel_index[i]] * scale[i] centred at xy[i] into `canvas` (H, W), clipped at its border."""
    h, w = canvas.shape
    cx, cy = np.rint(xy[:, 0]).astype(np.int64), np.rint(xy[:, 1]).astype(np.int64)
    flat_index, flat_value = [], []
    for k, (dy, dx, value) in enumerate(kernels):
        sel = kernel_index == k
        rows = cy[sel, None] + dy[None, :]  # (n_k, kernel pixels)
        cols = cx[sel, None] + dx[None, :]  # (n_k, kernel pixels)
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        flat_index.append((rows * w + cols)[inside])
        flat_value.append((scale[sel, None] * value[None, :])[inside])
    if flat_index:
        idx, val = np.concatenate(flat_index), np.concatenate(flat_value)
        canvas += np.bincount(idx, weights=val, minlength=h * w).reshape(h, w).astype(np.float32)


def render_slide(
    rng: np.random.Generator,
    fields: LatentFields,
    size: tuple[int, int],
    px_um: float,
    stain_scale: np.ndarray,
) -> np.ndarray:
    """The H&E-like RGB uint8 image (H, W, 3) of one slide of (width, height) = `size` pixels of `px_um`."""
    w, h = size
    tumour, immune, stroma = (upsample(p, size) for p in fields.programs)
    grain = ndimage.gaussian_filter(rng.standard_normal((h, w), dtype=np.float32), sigma=1.0 / px_um)
    grain /= max(float(grain.std()), 1e-6)  # (H, W) unit-variance pixel-scale texture
    tissue = upsample(fields.tissue, size)  # (H, W) signed level, 0 on the border
    tissue *= 40.0
    tissue += 0.5 + 0.15 * grain
    np.clip(tissue, 0.0, 1.0, out=tissue)  # (H, W) soft tissue alpha with a ragged edge

    # eosin: collagen fibres in stroma (wavy parallel bands), moderate cytoplasm elsewhere
    xs = np.arange(w, dtype=np.float32) * np.float32(px_um * np.cos(fields.fibre_angle))
    ys = np.arange(h, dtype=np.float32) * np.float32(px_um * np.sin(fields.fibre_angle))
    fibres = upsample(fields.fibre_warp, size)  # (H, W) micrometres along the fibre normal
    fibres += xs[None, :]
    fibres += ys[:, None]
    fibres *= np.float32(2 * np.pi / 9.0)  # 9 um between fibres
    np.sin(fibres, out=fibres)
    fibres = (0.5 + 0.5 * fibres) ** 3  # (H, W) thin bright bands in [0, 1]
    eosin = 0.30 + 0.15 * tumour + 0.05 * immune + stroma * (0.25 + 0.55 * fibres) + 0.04 * grain
    np.clip(eosin, 0.0, None, out=eosin)
    hema = 0.10 * tumour + 0.05 * immune + 0.02 * grain  # purplish cytoplasm / background haze
    del tumour, immune, stroma, fibres

    # nuclei: Poisson points per program, stamped from a small bank of precomputed shapes
    nuclei = np.zeros((h, w), dtype=np.float32)
    tissue_mask = (fields.tissue > 0).astype(np.float64)
    for p, program in enumerate(PROGRAMS):
        spec = _NUCLEI[program]
        xy = _place_nuclei(rng, fields.programs[p] * tissue_mask, spec["density"], size, px_um)
        if program == "stroma":  # fibroblasts lie along the fibres
            angles = fields.fibre_angle + np.pi / 2 + rng.normal(0, 0.25, size=_N_KERNELS)
        else:
            angles = rng.uniform(0, np.pi, size=_N_KERNELS)
        kernels = _nucleus_kernels(rng, program, px_um, angles)
        _stamp(
            nuclei,
            xy,
            rng.integers(0, _N_KERNELS, size=len(xy)),
            rng.uniform(0.85, 1.15, size=len(xy)),
            kernels,
        )
    nuclei *= 1.0 + 0.12 * grain  # chromatin texture
    nuclei /= 2.2
    np.tanh(nuclei, out=nuclei)
    hema += 2.2 * nuclei  # overlapping nuclei saturate at 2.2
    del nuclei

    # Beer-Lambert: optical density per channel -> transmitted light
    hema *= tissue
    hema *= np.float32(stain_scale[0])
    eosin *= tissue
    eosin *= np.float32(stain_scale[1])
    glass = np.float32(_GLASS_OD) * (1.0 + 0.2 * grain)
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    for c in range(3):
        od = hema * _HEMATOXYLIN_OD[c]
        od += eosin * _EOSIN_OD[c]
        od += glass
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= 255.0
        rgb[..., c] = od  # in (0, 255]: the cast truncates
    return rgb


# --- spots and expression --------------------------------------------------------------------------------
