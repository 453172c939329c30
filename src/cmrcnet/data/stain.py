"""Slide-level colour normalisation (Reinhard) towards the training sections' stain, and background unification.

Slides from another scanner or lab differ in stain balance and background (white glass, black export
background). A model trained on one site's colours, and in particular its handcrafted colour statistics, reads
such slides badly. Reinhard normalisation maps the colour distribution of a whole test slide onto that of the
training patches, in CIE L*a*b* (torchstain's conversions, OpenCV scaling: L, a, b in [0, 255]):

    lab' = (lab - mean_slide) / std_slide * std_train + mean_train      per channel, tissue pixels only

The statistics of a slide are taken over all its tissue pixels at once (not per patch), so colour differences
between regions of one slide, which carry information about expression, are kept. Tissue pixels are those
that are neither background-white nor background-black (L* bounds below). Near-black background pixels are
turned white, like the glass of the training slides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torchstain.numpy.utils.lab2rgb import lab2rgb
from torchstain.numpy.utils.rgb2lab import rgb2lab

from cmrcnet.atomic import write_json
from cmrcnet.errors import ConfigError, InputFileError

WHITE_L = 0.90 * 255  # L* (OpenCV scale) above this: white background
BLACK_L = 0.06 * 255  # L* below this: black background (dark nuclei stay well above)
MAX_PIXELS = 2_000_000  # pixels sampled for the statistics
STAIN_FORMAT = "cmrcnet-stain-reference"


@dataclass
class LabStats:
    """Mean and standard deviation of L*, a*, b* over tissue pixels."""

    mean: list[float]
    std: list[float]
    n_pixels: int

    def to_dict(self) -> dict:
        return {"format": STAIN_FORMAT, **asdict(self)}


def _to_lab(images: np.ndarray) -> np.ndarray:
    return rgb2lab(np.asarray(images, dtype=np.float32) / 255.0)


def _tissue(lab: np.ndarray) -> np.ndarray:
    return (lab[..., 0] < WHITE_L) & (lab[..., 0] > BLACK_L)


def lab_stats(images: np.ndarray, *, max_pixels: int = MAX_PIXELS, seed: int = 0) -> LabStats:
    """LabStats of the tissue pixels of uint8 RGB images (..., 3): patches (N, S, S, 3) or one image (H, W, 3).

    At most `max_pixels` pixels (a seeded random sample) are converted."""
    pixels = np.asarray(images).reshape(-1, 3)
    if len(pixels) > max_pixels:
        pixels = pixels[np.random.default_rng(seed).choice(len(pixels), max_pixels, replace=False)]
    lab = _to_lab(pixels)
    lab = lab[_tissue(lab)]
    if len(lab) < 100:
        raise ConfigError(f"too few tissue pixels ({len(lab)}) for colour statistics")
    return LabStats([float(v) for v in lab.mean(0)], [float(v) for v in lab.std(0)], len(lab))


def reinhard(images: np.ndarray, source: LabStats, target: LabStats, *, chunk: int = 256) -> np.ndarray:
    """uint8 RGB images (N, S, S, 3) mapped from the `source` colour statistics to the `target` ones; black
    background made white. Returns uint8 of the same shape."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[-1] != 3:
        raise ConfigError(f"stain normalisation needs uint8 RGB images (..., 3), got {images.dtype} {images.shape}")
    mu_s, sd_s = np.array(source.mean), np.maximum(np.array(source.std), 1e-6)
    mu_t, sd_t = np.array(target.mean), np.array(target.std)
    out = np.empty_like(images)
    for i in range(0, len(images), chunk):
        lab = _to_lab(images[i:i + chunk])
        tissue = _tissue(lab)
        mapped = (lab - mu_s) / sd_s * sd_t + mu_t
        lab = np.where(tissue[..., None], mapped, lab)
        rgb = np.clip(lab2rgb(lab), 0.0, 1.0)
        rgb[lab[..., 0] <= BLACK_L] = 1.0  # black background -> white glass
        out[i:i + chunk] = np.round(rgb * 255).astype(np.uint8)
    return out


def whiten_black(images: np.ndarray, *, chunk: int = 256) -> np.ndarray:
    """uint8 RGB images (N, S, S, 3) with their near-black background pixels (L* below `BLACK_L`) made white, like
    the glass of the training slides; nothing else changes."""
    out = np.array(images, dtype=np.uint8, copy=True)
    for i in range(0, len(out), chunk):
        part = out[i:i + chunk]
        part[_to_lab(part)[..., 0] <= BLACK_L] = 255
    return out


def normalise_to(images: np.ndarray, target: LabStats) -> np.ndarray:
    """Slide-level Reinhard: the statistics of `images` themselves (all patches of one slide) to `target`."""
    return reinhard(images, lab_stats(images), target)


def normalise_table(table, target: LabStats) -> None:
    """Map each sample's patches of a SpotTable (in place) onto `target`, with the statistics of all of that
    sample's patches in the table (slide-level Reinhard, `normalise_to`)."""
    import torch

    ids = np.asarray(table.sample_ids)
    for sid in dict.fromkeys(table.sample_ids):
        rows = torch.from_numpy(np.flatnonzero(ids == sid))
        table.images[rows] = torch.from_numpy(normalise_to(table.images[rows].numpy(), target))


def training_stain_reference(dataset, samples: list[str], *, max_pixels: int = MAX_PIXELS) -> LabStats:
    """LabStats of the tissue pixels of the prepared patches of `samples` (a run's training samples)."""
    patches = [dataset.read_patches(s).img for s in samples if dataset.has_image(s)]
    if not patches:
        raise ConfigError(f"none of the samples {samples} has an image for colour statistics")
    return lab_stats(np.concatenate([p.reshape(-1, 3) for p in patches]), max_pixels=max_pixels)


def save_stain_reference(stats: LabStats, path: str | Path) -> Path:
    path = Path(path)
    write_json(path, stats.to_dict())
    return path


def load_stain_reference(path: str | Path) -> LabStats:
    import json

    path = Path(path)
    if not path.is_file():
        raise InputFileError("no stain reference in this run (trained before stain normalisation existed); "
                             "retrain, or predict without stain_normalise=True", path=path)
    try:
        d = json.loads(path.read_text())
        if d.get("format") != STAIN_FORMAT:
            raise ValueError(f"format is {d.get('format')!r}")
        return LabStats([float(v) for v in d["mean"]], [float(v) for v in d["std"]], int(d["n_pixels"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputFileError(f"not a cmrcnet stain reference ({exc})", path=path) from exc
