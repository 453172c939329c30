"""`cmrcnet prepare`: one sample from any reader -> patches + counts + metadata in a prepared dataset."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cmrcnet.constants import DEFAULT_FOV_UM, DEFAULT_PATCH_PX, ST_FOV_UM
from cmrcnet.data.dataset import write_sample
from cmrcnet.data.patches import extract_patches
from cmrcnet.data.sample import Sample
from cmrcnet.errors import InputFileError

logger = logging.getLogger(__name__)


@dataclass
class PrepareSummary:
    """What `prepare_sample` did, for printing and for tests."""

    sample_id: str
    patient_id: str
    n_spots: int
    n_genes: int
    pixel_size_um: float
    pixel_size_source: str
    n_patches: int
    n_padded: int
    dropped: dict[str, int]
    out_dir: Path
    fov_um: float = DEFAULT_FOV_UM  # the patches' physical side

    def lines(self) -> list[str]:
        drops = ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n) or "none"
        return [
            f"sample {self.sample_id} (patient {self.patient_id}) -> {self.out_dir}",
            f"  spots: {self.n_spots}, genes: {self.n_genes}",
            f"  pixel size: {self.pixel_size_um:.4f} um/px ({self.pixel_size_source})",
            f"  patches written: {self.n_patches} of {self.fov_um:g} um ({self.n_padded} padded at image borders)",
            f"  spots dropped: {drops}",
        ]


def drop_empty_spots(sample: Sample) -> int:
    """Remove spots with zero total counts (nothing measured, cannot be normalised); return how many."""
    x = sample.counts.X
    totals = np.asarray(x.sum(axis=1)).reshape(-1) if sp.issparse(x) else np.asarray(x).sum(axis=1)
    empty = totals <= 0
    if empty.all():
        raise InputFileError("every spot has zero counts", path=sample.source.get("counts", sample.sample_id))
    if empty.any():
        logger.warning("%s: dropping %d spots with zero total counts", sample.sample_id, int(empty.sum()))
        sample.counts = sample.counts[~empty].copy()
    return int(empty.sum())


def default_fov_um(sample: Sample) -> float:
    """The patch field of view `prepare` uses unless told: `ST_FOV_UM` (224 um) for legacy ST, whose spots lie
    200 um apart (read as "st", or a HEST-1k sample whose metadata says "Spatial Transcriptomics"), else
    `DEFAULT_FOV_UM` (112 um, HEST-1k's patches)."""
    legacy_st = sample.technology == "st" or sample.source.get("st_technology") == "spatial transcriptomics"
    return ST_FOV_UM if legacy_st else DEFAULT_FOV_UM


def prepare_sample(
    sample: Sample,
    out_dir: str | Path,
    *,
    fov_um: float | None = None,
    patch_px: int = DEFAULT_PATCH_PX,
    progress: bool = True,
    dropped: dict[str, int] | None = None,
) -> PrepareSummary:
    """Extract patches of `fov_um` (None: `default_fov_um`) and write the sample into `out_dir` (replacing an
    earlier version atomically)."""
    fov_um = default_fov_um(sample) if fov_um is None else fov_um
    dropped = {**sample.dropped, **(dropped or {})}
    dropped["zero-count"] = drop_empty_spots(sample)
    patches = None
    if sample.image is not None:
        patches = extract_patches(
            sample.image,
            sample.coords,
            sample.counts.obs_names,
            pixel_size_um=sample.pixel_size_um,
            fov_um=fov_um,
            patch_px=patch_px,
            progress=progress,
            desc=f"{sample.sample_id} patches",
        )
    else:
        logger.info("%s has no image: writing expression only (usable in a reference bank)", sample.sample_id)
    write_sample(out_dir, sample, patches, patch_px=patch_px)
    if sample.image is not None:
        sample.image.release()
    return PrepareSummary(
        sample_id=sample.sample_id,
        patient_id=sample.patient_id,
        n_spots=sample.n_spots,
        n_genes=sample.counts.n_vars,
        pixel_size_um=sample.pixel_size_um,
        pixel_size_source=sample.pixel_size_source,
        n_patches=0 if patches is None else len(patches.img),
        n_padded=0 if patches is None else patches.n_padded,
        dropped=dropped,
        out_dir=Path(out_dir),
        fov_um=fov_um,
    )
