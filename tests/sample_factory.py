"""Tiny synthetic samples for tests, importable by plain name (`from sample_factory import make_sample`)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cmrcnet.constants import SPATIAL_KEY
from cmrcnet.data.image import SlideImage
from cmrcnet.data.sample import Sample, finalize_counts

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_sample(
    sample_id: str = "s1",
    *,
    n_rows: int = 4,
    n_cols: int = 5,
    n_genes: int = 30,
    pitch_px: float = 40.0,
    margin_px: float = 60.0,
    pixel_size_um: float = 1.0,
    patient_id: str | None = None,
    seed: int = 0,
    image: bool = True,
) -> Sample:
    """A small grid sample with Poisson counts and a plain grey image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n_rows, 0:n_cols]
    centers = np.stack([margin_px + xx.ravel() * pitch_px, margin_px + yy.ravel() * pitch_px], axis=1)
    n = len(centers)
    rates = rng.gamma(2.0, 2.0, size=(1, n_genes)) * rng.uniform(0.5, 1.5, size=(n, 1))
    counts = rng.poisson(rates).astype(np.float32)
    counts[:, 0] += 1  # no empty spots
    a = ad.AnnData(sp.csr_matrix(counts))
    a.obs_names = [f"{x}x{y}" for x, y in zip(xx.ravel(), yy.ravel(), strict=True)]
    a.var_names = [f"G{i:03d}" for i in range(n_genes)]
    a.obsm[SPATIAL_KEY] = centers
    pid = patient_id or sample_id
    a = finalize_counts(a, sample_id=sample_id, patient_id=pid, path=f"memory://{sample_id}")
    img = None
    if image:
        w = int(2 * margin_px + (n_cols - 1) * pitch_px)
        h = int(2 * margin_px + (n_rows - 1) * pitch_px)
        img = SlideImage.from_array(np.full((h, w, 3), 200, np.uint8), f"memory://{sample_id}.png")
    return Sample(
        sample_id, a, img, pixel_size_um, "user", pid, "unknown", {"counts": f"memory://{sample_id}"}
    )
