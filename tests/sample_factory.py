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


def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> Path:
    """A 10x feature-barcode matrix (genes x barcodes CSC under /matrix, Space Ranger's layout)."""
    import h5py

    m = sp.csc_matrix(np.asarray(counts).T)  # (n_genes, n_barcodes)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        fg = g.create_group("features")
        fg["name"] = np.array([n.encode() for n in genes])
        fg["id"] = np.array([f"ENSG{i:05d}".encode() for i in range(len(genes))])
        fg["feature_type"] = np.array([b"Gene Expression"] * len(genes))
    return path


def write_visium_outs(
    root: Path, *, n_rows: int = 4, n_cols: int = 8, n_genes: int = 5, um_per_px: float = 1.0
) -> Path:
    """A tiny Space Ranger `outs/` folder: hexagonal grid, matrix .h5, tissue_positions.csv, scale factors and
    a hires PNG (scale 0.5)."""
    import json
    import math

    import pandas as pd
    from PIL import Image

    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    keep = (rows + cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    pitch_px = 100.0 / um_per_px
    barcodes = [f"AAAC{i:04d}-1" for i in range(len(rows))]
    x = 60.0 + cols * pitch_px / 2.0
    y = 60.0 + rows * pitch_px * math.sqrt(3.0) / 2.0
    (root / "spatial").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": np.round(y).astype(int),
            "pxl_col_in_fullres": np.round(x).astype(int),
        }
    ).to_csv(root / "spatial" / "tissue_positions.csv", index=False)
    counts = np.random.default_rng(0).poisson(3.0, size=(len(rows), n_genes)) + 1
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", counts, barcodes, [f"G{i}" for i in range(n_genes)])
    factors = {
        "spot_diameter_fullres": 65.0 / um_per_px,
        "tissue_hires_scalef": 0.5,
        "tissue_lowres_scalef": 0.1,
    }
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    w, h = int((x.max() + 60) * 0.5), int((y.max() + 60) * 0.5)
    Image.new("RGB", (w, h), (220, 180, 200)).save(root / "spatial" / "tissue_hires_image.png")
    return root
