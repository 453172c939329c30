"""The files of a slide prediction: prediction.h5ad, thumbnail, tissue mask, heatmaps, tumour maps, GeoJSON."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np

from cmrcnet.atomic import atomic_path
from cmrcnet.constants import CMRCNET_UNS
from cmrcnet.data.hdf5 import write_h5ad
from cmrcnet.data.tissue import TissueMask
from cmrcnet.inference.confidence import LOW_PERCENTILE, SIMILARITY_KEY
from cmrcnet.inference.export import GEOJSON_FILE, write_tiles_geojson
from cmrcnet.inference.tiles import TileGrid
from cmrcnet.inference.tumour import SCORE_KEY, TUMOUR_KEY

PREDICTION_FILE = "prediction.h5ad"
TISSUE_MASK_FILE = "tissue_mask.png"  # 8-bit, 255 = tissue, at thumbnail resolution
THUMBNAIL_FILE = "thumbnail.png"
SCORE_MAP_FILE = "tumour_score.png"
TUMOUR_MASK_FILE = "tumour_mask.png"
CONFIDENCE_MAP_FILE = "confidence.png"  # per-tile retrieval similarity
SUMMARY_FILE = "summary.json"
HEATMAP_PREFIX = "heatmap_"  # heatmap_<gene>.png
SCORE_CONTOUR_QUANTILE = 0.8  # the tumour score map outlines its top 20 % of tiles on the thumbnail


def _safe_name(gene: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", gene)


def write_slide_outputs(
    out_dir: Path,
    adata: ad.AnnData,
    thumb: np.ndarray,
    mask: TissueMask,
    grid: TileGrid,
    *,
    map_genes: Sequence[str],
    score_map: bool,
    tumour_mask: bool,
    confidence_map: bool = False,
) -> list[Path]:
    """Write the slide's files atomically into `out_dir` (prediction.h5ad last) and list them.

    Parameters
    ----------
    out_dir
        The output folder (created).
    adata
        The tile predictions, with obs "grid_row", "grid_col" (and the tumour keys when scored) and
        uns["cmrcnet"] ("sample_id", "tumour_markers", "tumour_threshold").
    thumb, mask, grid
        The slide's thumbnail, its tissue mask and the tile grid.
    map_genes
        Genes to draw heatmaps of.
    score_map, tumour_mask
        Draw the tumour score map; draw the thresholded tumour mask.
    confidence_map
        Draw obs "retrieval_similarity" (the reference's 5th percentile, when uns["cmrcnet"] holds one, is
        drawn as a contour and named in the title).

    Returns
    -------
    list of Path
        The files written.
    """
    from cmrcnet.plotting.slide_maps import plot_tile_map, save_mask_png, save_rgb_png

    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = [write_tiles_geojson(adata, out_dir / GEOJSON_FILE)]  # QuPath: File > Import objects
    save_rgb_png(thumb, out_dir / THUMBNAIL_FILE)
    files.append(out_dir / THUMBNAIL_FILE)
    save_mask_png(mask.mask, out_dir / TISSUE_MASK_FILE)
    files.append(out_dir / TISSUE_MASK_FILE)
    sid = str(adata.uns[CMRCNET_UNS]["sample_id"])
    rows, cols = adata.obs["grid_row"].to_numpy(), adata.obs["grid_col"].to_numpy()
    geometry = dict(origin_px=grid.origin_px, step_px=grid.step_px, n_rows=grid.n_rows, n_cols=grid.n_cols)
    col = {g: i for i, g in enumerate(adata.var_names)}
    for gene in map_genes:
        path = out_dir / f"{HEATMAP_PREFIX}{_safe_name(gene)}.png"
        plot_tile_map(
            thumb,
            mask.downsample,
            rows,
            cols,
            np.asarray(adata.X[:, col[gene]]),
            path,
            title=f"{sid}: predicted {gene}",
            label="log1p expression",
            **geometry,
        )
        files.append(path)
    if score_map:
        score = adata.obs[SCORE_KEY].to_numpy(dtype=np.float64)
        lim = float(np.abs(score).max()) or 1.0
        markers = adata.uns[CMRCNET_UNS]["tumour_markers"]
        plot_tile_map(
            thumb,
            mask.downsample,
            rows,
            cols,
            score,
            out_dir / SCORE_MAP_FILE,
            title=f"{sid}: tumour score (mean z of {', '.join(markers)})",
            label="mean marker z-score",
            cmap="RdBu_r",
            vmin=-lim,
            vmax=lim,
            contour_quantile=SCORE_CONTOUR_QUANTILE,
            **geometry,
        )
        files.append(out_dir / SCORE_MAP_FILE)
    if tumour_mask:
        thr = adata.uns[CMRCNET_UNS]["tumour_threshold"]
        plot_tile_map(
            thumb,
            mask.downsample,
            rows,
            cols,
            adata.obs[TUMOUR_KEY].to_numpy().astype(np.float64),
            out_dir / TUMOUR_MASK_FILE,
            title=f"{sid}: tumour score >= {thr:g}",
            categories=["not tumour", "tumour"],
            **geometry,
        )
        files.append(out_dir / TUMOUR_MASK_FILE)
    if confidence_map and SIMILARITY_KEY in adata.obs:
        files.append(_confidence_map(out_dir, adata, thumb, mask, rows, cols, sid, geometry))
    with atomic_path(out_dir / PREDICTION_FILE) as tmp:
        write_h5ad(adata, tmp)
    files.append(out_dir / PREDICTION_FILE)
    return files


def _confidence_map(
    out_dir: Path,
    adata: ad.AnnData,
    thumb: np.ndarray,
    mask: TissueMask,
    rows: np.ndarray,
    cols: np.ndarray,
    sid: str,
    geometry: dict,
) -> Path:
    """confidence.png: each tile's retrieval similarity, with the reference's 5th percentile as a contour."""
    from cmrcnet.plotting.slide_maps import plot_tile_map

    reference = adata.uns[CMRCNET_UNS].get("confidence_reference")
    low = None if reference is None else float(reference["quantiles"][str(LOW_PERCENTILE)])
    title = f"{sid}: retrieval similarity"
    if low is not None:
        title += f" (line: training validation p{LOW_PERCENTILE} = {low:.3f})"
    path = out_dir / CONFIDENCE_MAP_FILE
    plot_tile_map(
        thumb,
        mask.downsample,
        rows,
        cols,
        adata.obs[SIMILARITY_KEY].to_numpy(dtype=np.float64),
        path,
        title=title,
        label="mean cosine similarity of the k neighbours",
        cmap="magma",
        contour_level=low,
        **geometry,
    )
    return path
