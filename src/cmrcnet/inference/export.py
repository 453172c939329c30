"""Predictions for other tools: scanpy/squidpy's `uns["spatial"]`, and per-tile GeoJSON for QuPath.

scanpy (`sc.pl.spatial`) and squidpy (`sq.pl.spatial_scatter`) draw an AnnData on its tissue when
`uns["spatial"][library_id]` holds `images["hires"]` (an RGB array) and `scalefactors` with `tissue_hires_scalef`
(image px per full-resolution px) and `spot_diameter_fullres`, as Space Ranger-read AnnData do; `obsm["spatial"]`
is in full-resolution pixels, and `obs["library_id"]` names each row's library when there are several.

QuPath (0.4 and newer) reads a GeoJSON FeatureCollection through File > Import objects (or drag and drop): each
Feature becomes an object whose `properties.objectType` says what kind ("tile" here), whose
`properties.measurements` (name -> number) fill its measurement table, and whose geometry is in full-resolution
pixel coordinates of the slide (x to the right, y down), the same coordinates as the prediction's
`obsm["spatial"]`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

from cmrcnet.atomic import write_text
from cmrcnet.constants import CMRCNET_UNS, SPATIAL_KEY
from cmrcnet.inference.tumour import SCORE_KEY

GEOJSON_FILE = "tiles.geojson"


def tiles_geojson(adata: ad.AnnData, *, genes: list[str] | None = None) -> dict[str, Any]:
    """A FeatureCollection with one square Polygon per tile of a slide prediction.

    Each tile is the model's field of view centred at `obsm["spatial"]` (side `uns["cmrcnet"]["fov_px"]`).
    Measurements: the predicted log1p expression of `genes` (default all) and, when present, the tumour score.
    """
    info = adata.uns.get(CMRCNET_UNS, {})
    side = float(info["fov_px"])
    centres = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)  # (N, 2) x, y
    names = list(adata.var_names) if genes is None else list(genes)
    cols = [list(adata.var_names).index(g) for g in names]
    x = np.asarray(adata.X[:, cols] if cols else np.zeros((adata.n_obs, 0)), dtype=np.float64)  # (N, G')
    score = adata.obs[SCORE_KEY].to_numpy(dtype=np.float64) if SCORE_KEY in adata.obs else None
    half = side / 2.0
    features = []
    for i, (cx, cy) in enumerate(centres):
        ring = [
            [cx - half, cy - half],
            [cx + half, cy - half],
            [cx + half, cy + half],
            [cx - half, cy + half],
        ]
        ring.append(ring[0])
        measurements = {g: _number(v) for g, v in zip(names, x[i], strict=True)}
        if score is not None:
            measurements[SCORE_KEY] = _number(score[i])
        features.append(
            {
                "type": "Feature",
                "id": str(adata.obs_names[i]),
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[round(a, 2), round(b, 2)] for a, b in ring]],
                },
                "properties": {
                    "objectType": "tile",
                    "name": str(adata.obs_names[i]),
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _number(v: float) -> float | None:
    return None if not math.isfinite(float(v)) else round(float(v), 5)


def write_tiles_geojson(adata: ad.AnnData, path: str | Path, *, genes: list[str] | None = None) -> Path:
    """Write `tiles_geojson` atomically; returns the path."""
    path = Path(path)
    write_text(path, json.dumps(tiles_geojson(adata, genes=genes), separators=(",", ":")) + "\n")
    return path


SPOT_DIAMETER_UM = {"st": 100.0, "visium": 55.0, "synthetic": 55.0}  # measured spot diameters by technology
SPATIAL_UNS = "spatial"


def spatial_library(image, hires_scalef: float, spot_diameter_fullres: float) -> dict[str, Any]:
    """One `uns["spatial"][library_id]` entry: a tissue image and its scale factors (scanpy's layout)."""
    return {
        "images": {"hires": np.ascontiguousarray(image, dtype=np.uint8)},
        "scalefactors": {
            "tissue_hires_scalef": float(hires_scalef),
            "spot_diameter_fullres": float(spot_diameter_fullres),
        },
        "metadata": {"source": "cmrcnet"},
    }
