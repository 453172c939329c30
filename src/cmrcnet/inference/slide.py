"""`cmrcnet predict-slide`: predict expression over a whole slide, tile by tile, with bounded memory.

Pipeline:
1. Open the slide (cmrcnet.data.slide_reader) and take its pixel size from the metadata or the user.
2. Read a thumbnail (about 8 pixels per tile side, at most THUMB_MAX_SIDE) block by block and detect tissue on it
   (tissue.py).
3. Lay a regular grid of square tiles over the slide: side = the model's field of view (run.json `fov_um`), step
   `step_um` (default: the field of view, i.e. tiles side by side; smaller steps overlap). Tile (row, col) is
   centred at (fov/2 + col * step, fov/2 + row * step) full-resolution pixels; the grid covers the whole image
   (tiles at the right/bottom edge are padded white). Tiles whose area is at least `min_tissue` tissue are kept.
4. Stream the kept tiles in batches: read each from the pyramid level nearest the resolution the model needs
   (the coarsest level not coarser than it), resample it exactly as training patches were made (to the prepared
   patch size with PIL's box filter, then to the model's input size), embed, and predict by retrieval from the
   run's reference bank (or directly, for the regression method). The next batch is read in a background thread
   while the current one is embedded. Memory holds a batch or two of tiles plus one row of predictions per tile.
5. Write OUT_DIR/prediction.h5ad (tiles x genes), the tissue mask, thumbnail, heatmaps, tumour score map
   (and mask with a threshold), and summary.json, each atomically.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cmrcnet.atomic import atomic_path, write_json
from cmrcnet.constants import CMRCNET_UNS, SAMPLE_KEY, SPATIAL_KEY
from cmrcnet.data.markers import default_markers, default_tumour_markers
from cmrcnet.data.slide_reader import (
    SlideReader,
    open_slide,
    read_thumbnail,
    read_tile,
    resolve_slide_pixel_size,
)
from cmrcnet.data.spots import resize_uint8
from cmrcnet.data.tissue import TissueConfig, TissueMask, detect_tissue
from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.inference.bank import Bank, load_bank
from cmrcnet.inference.export import GEOJSON_FILE, SPATIAL_UNS, spatial_library, write_tiles_geojson
from cmrcnet.inference.predict import BankRetriever, embed_patches, prediction_provenance
from cmrcnet.inference.tumour import SCORE_KEY, TUMOUR_KEY, tumour_score
from cmrcnet.reports import REPORT_FILE, slide_report
from cmrcnet.run.load import TrainedModel, load_trained_model
from cmrcnet.runtime import resolve_precision

logger = logging.getLogger(__name__)

PREDICTION_FILE = "prediction.h5ad"
TISSUE_MASK_FILE = "tissue_mask.png"  # 8-bit, 255 = tissue, at thumbnail resolution
THUMBNAIL_FILE = "thumbnail.png"
SCORE_MAP_FILE = "tumour_score.png"
TUMOUR_MASK_FILE = "tumour_mask.png"
SUMMARY_FILE = "summary.json"
HEATMAP_PREFIX = "heatmap_"  # heatmap_<gene>.png

THUMB_PX_PER_TILE = 8  # thumbnail pixels along a tile side (tissue-mask resolution)
THUMB_MAX_SIDE = 2048  # thumbnail never larger than this (memory and figure size)
DEFAULT_MIN_TISSUE = 0.5  # fraction of a tile's area that must be tissue
MAX_DEFAULT_MAPS = 8  # heatmaps drawn by default (markers present in the model's genes)
N_FALLBACK_MAPS = 4  # ... else this many first genes


@dataclass
class TileGrid:
    """A regular grid of square tiles in full-resolution pixels; tile (row, col) is centred at
    (origin + col * step, origin + row * step) with origin = fov / 2."""

    fov_px: float  # tile side
    step_px: float  # centre-to-centre distance of neighbouring tiles
    n_rows: int
    n_cols: int

    @property
    def origin_px(self) -> float:
        return self.fov_px / 2.0

    @classmethod
    def over(cls, width: int, height: int, fov_px: float, step_px: float) -> TileGrid:
        """The grid covering a width x height image (the last row/column may reach beyond it)."""
        if not (fov_px > 0 and step_px > 0):
            raise ConfigError(f"tile side and step must be positive, got {fov_px} and {step_px} px")

        def count(length: int) -> int:
            return max(1, math.ceil((length - fov_px) / step_px - 1e-9) + 1)

        return cls(float(fov_px), float(step_px), count(height), count(width))

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of every grid position, row-major."""
        rows, cols = np.divmod(np.arange(self.n_rows * self.n_cols, dtype=np.int64), self.n_cols)
        return rows, cols

    def centers(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(N, 2) centres (x, y) in full-resolution pixels."""
        x = self.origin_px + np.asarray(cols, dtype=np.float64) * self.step_px
        y = self.origin_px + np.asarray(rows, dtype=np.float64) * self.step_px
        return np.stack([x, y], axis=1)


@dataclass
class SlidePrediction:
    """What `predict_slide` produced."""

    adata: ad.AnnData  # tiles x genes
    out_dir: Path
    files: list[Path]
    stats: dict[str, Any] = field(default_factory=dict)  # timings, tile counts, level, ...


def model_fov_um(trained: TrainedModel) -> float:
    """Physical side (um) of the patches the model was trained on (run.json `fov_um`)."""
    fov = trained.run_info.get("fov_um")
    if fov is None or not float(fov) > 0:
        raise ConfigError(
            "the run records no field of view (run.json 'fov_um'); it was trained by an older version",
            path=trained.run_dir,
        )
    return float(fov)


def _prep_px(trained: TrainedModel) -> int:
    """Side the training patches were cut at (run.json `patch_px`), else the model's input size."""
    sizes = trained.run_info.get("patch_px") or []
    sizes = sizes if isinstance(sizes, list) else [sizes]
    return int(sizes[0]) if len(sizes) == 1 else int(trained.model_config.img_size)


def default_map_genes(genes: Sequence[str]) -> list[str]:
    """Marker genes the model predicts (at most MAX_DEFAULT_MAPS), else its first N_FALLBACK_MAPS genes."""
    present = [g for g in default_markers(genes) if g in set(genes)]
    return present[:MAX_DEFAULT_MAPS] if present else list(genes[:N_FALLBACK_MAPS])


def _safe_name(gene: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", gene)


def predict_slide(
    model: str | Path,
    slide: str | Path,
    out_dir: str | Path,
    *,
    pixel_size_um: float | None = None,
    step_um: float | None = None,
    genes: Sequence[str] | None = None,
    markers: Sequence[str] | None = None,
    threshold: float | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    device: str = "cpu",
    k: int | None = None,
    weighting: str | None = None,
    sample_id: str | None = None,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    tissue: TissueConfig | None = None,
    reader: str = "auto",
    plots: bool = True,
    progress: bool = True,
) -> SlidePrediction:
    """Predict log1p expression for every tissue tile of `slide` and write the outputs into `out_dir`.

    Args:
        model: run folder of a trained model (with its reference bank unless the method is regression).
        slide: WSI (svs, ndpi, mrxs, ... via OpenSlide), OME/plain TIFF, JPEG or PNG.
        out_dir: output folder (created; existing files of the same names are replaced).
        pixel_size_um: micrometres per full-resolution pixel; overrides the slide's metadata, required without.
        step_um: grid step; default the model's field of view (tiles side by side).
        genes: genes to draw heatmaps of; default `default_map_genes`.
        markers: genes of the tumour score; default `default_tumour_markers`. Markers the model lacks are
            skipped; with none left, a given list is an error and the default is a warning (no score).
        threshold: tumour score at or above which a tile is called tumour (obs["tumour"] + a mask PNG).
        batch_size: tiles per forward pass (and per read batch).
        precision: "auto" (default; measured, see `cmrcnet.runtime.resolve_precision`), "fp32", "bf16", "fp16".
        k, weighting: retrieval settings; default the run's.
        sample_id: the slide's id (default: file name without suffixes); bank spots of this id are excluded.
        min_tissue: fraction of a tile that must be tissue for the tile to be predicted.
        tissue: tissue-detection parameters.
        reader: slide back end ("auto", "openslide", "tifffile", "pillow").
        plots: draw the heatmap and score PNGs.
    """
    t_start = time.perf_counter()
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"min_tissue must be in [0, 1], got {min_tissue}")
    if step_um is not None and not step_um > 0:
        raise ConfigError(f"step must be a positive number of micrometres, got {step_um}")
    out_dir = Path(out_dir)
    choice = resolve_precision(precision, device)
    trained = load_trained_model(model, device=device)
    fov_um = model_fov_um(trained)
    step_um = fov_um if step_um is None else float(step_um)
    model_genes = list(trained.genes)

    map_genes = default_map_genes(model_genes) if genes is None else list(dict.fromkeys(genes))
    unknown = [g for g in map_genes if g not in set(model_genes)]
    if unknown:
        raise ConfigError(f"genes {unknown} are not predicted by the model ({len(model_genes)} genes)")
    score_markers = _score_markers(model_genes, markers)
    if threshold is not None and not score_markers:
        raise ConfigError("a tumour threshold needs marker genes the model predicts (--markers)")

    regression = trained.model_config.method == "regression"
    rcfg = trained.run_config
    k = rcfg.retrieval.k if k is None else int(k)
    weighting = rcfg.retrieval.weighting if weighting is None else weighting

    with open_slide(slide, reader=reader) as slide_reader:
        slide_path = slide_reader.path
        sample_id = sample_id or slide_id(slide_path)
        bank = None if regression else load_bank(model, trained).without_sample(sample_id)
        um_per_px, px_source = resolve_slide_pixel_size(slide_reader, pixel_size_um)
        width, height = slide_reader.dimensions
        fov_px, step_px = fov_um / um_per_px, step_um / um_per_px
        grid = TileGrid.over(width, height, fov_px, step_px)

        thumb_target = max(fov_px / THUMB_PX_PER_TILE, max(width, height) / THUMB_MAX_SIDE, 1.0)
        thumb, thumb_ds = read_thumbnail(slide_reader, thumb_target)
        mask = detect_tissue(thumb, thumb_ds, um_per_px, tissue)
        rows, cols = grid.positions()
        coverage = mask.coverage(grid.centers(rows, cols), fov_px)
        keep = coverage >= max(min_tissue, 1e-9)
        if not keep.any():
            raise InputFileError(
                f"no tissue found: no tile of {fov_um:g} um is at least {100 * min_tissue:.0f}% tissue "
                f"(tissue covers {100 * mask.fraction:.1f}% of the thumbnail, saturation threshold "
                f"{mask.threshold:.3f}); is this an H&E image?",
                path=slide_path,
            )
        rows, cols, coverage = rows[keep], cols[keep], coverage[keep]
        centers = grid.centers(rows, cols)

        prep_px = _prep_px(trained)
        level = slide_reader.best_level_for_downsample(fov_px / prep_px)
        logger.info(
            "%s: %.4f um/px (%s); %d of %d grid tiles are tissue; tile %.1f px read at level %d (downsample %.2f)",
            sample_id,
            um_per_px,
            px_source,
            len(rows),
            grid.n_rows * grid.n_cols,
            fov_px,
            level,
            slide_reader.level_downsamples[level],
        )
        t_pred = time.perf_counter()
        preds = _predict_tiles(
            trained,
            slide_reader,
            level,
            centers,
            fov_px,
            prep_px,
            bank=bank,
            sample_id=sample_id,
            k=k,
            weighting=weighting,
            batch_size=batch_size,
            precision=choice.precision,
            progress=progress,
        )
        seconds_pred = time.perf_counter() - t_pred
        level_ds = float(slide_reader.level_downsamples[level])
        reader_kind = slide_reader.kind

    adata = ad.AnnData(preds)
    adata.var_names = model_genes
    adata.obs_names = [f"r{r}c{c}" for r, c in zip(rows, cols, strict=True)]
    adata.obs[SAMPLE_KEY] = pd.Categorical([sample_id] * len(rows))
    adata.obs["grid_row"] = rows
    adata.obs["grid_col"] = cols
    adata.obs["tissue_fraction"] = coverage.astype(np.float32)
    adata.obsm[SPATIAL_KEY] = centers
    used_markers: list[str] = []
    if score_markers:
        try:
            adata.obs[SCORE_KEY], used_markers = tumour_score(preds, model_genes, score_markers)
        except ConfigError as exc:  # e.g. markers constant over the tiles
            if threshold is not None:
                raise
            logger.warning("no tumour score: %s", exc.problem)
        if threshold is not None:
            adata.obs[TUMOUR_KEY] = adata.obs[SCORE_KEY].to_numpy() >= threshold

    stats = {
        "n_grid_tiles": int(grid.n_rows * grid.n_cols),
        "n_tissue_tiles": len(rows),
        "tissue_fraction": mask.fraction,
        "seconds_predict": round(seconds_pred, 3),
        "tiles_per_second": round(len(rows) / seconds_pred, 2) if seconds_pred > 0 else None,
        "level": int(level),
        "level_downsample": level_ds,
        "reader": reader_kind,
        "precision": choice.precision,
    }
    adata.uns[CMRCNET_UNS] = {
        **prediction_provenance(
            trained,
            bank,
            kind="slide_prediction",
            k=k,
            weighting=weighting,
            backend="exact",
            run_dir=model,
            precision=choice,
        ),
        "slide": str(Path(slide_path).resolve()),
        "sample_id": sample_id,
        "reader": reader_kind,
        "pixel_size_um": um_per_px,
        "pixel_size_source": px_source,
        "fov_um": fov_um,
        "fov_px": fov_px,
        "step_um": step_um,
        "step_px": step_px,
        "grid_origin_px": grid.origin_px,
        "grid_shape": [grid.n_rows, grid.n_cols],
        "level": int(level),
        "level_downsample": level_ds,
        "thumbnail_downsample": float(thumb_ds),
        "min_tissue": float(min_tissue),
        "tissue": {**(tissue or TissueConfig()).to_dict(), "threshold": mask.threshold, "otsu": mask.otsu},
        "tumour_markers": used_markers,
        "tumour_threshold": float("nan") if threshold is None else float(threshold),
    }
    adata.uns[SPATIAL_UNS] = {sample_id: spatial_library(thumb, 1.0 / thumb_ds, fov_px)}  # scanpy/squidpy
    adata.obs["library_id"] = pd.Categorical([sample_id] * len(rows))

    files = _write_outputs(
        out_dir,
        adata,
        thumb,
        mask,
        grid,
        map_genes=map_genes if plots else [],
        score_map=plots and bool(used_markers),
        tumour_mask=plots and threshold is not None and bool(used_markers),
    )
    stats["seconds_total"] = round(time.perf_counter() - t_start, 3)
    summary = {
        "slide": str(slide_path),
        "sample_id": sample_id,
        "model": str(model),
        "pixel_size_um": um_per_px,
        "pixel_size_source": px_source,
        "fov_um": fov_um,
        "step_um": step_um,
        "n_genes": len(model_genes),
        **stats,
        "files": [p.name for p in files] + [REPORT_FILE],
    }
    write_json(out_dir / SUMMARY_FILE, summary)
    files.append(out_dir / SUMMARY_FILE)
    files.append(slide_report(out_dir, summary, adata.uns[CMRCNET_UNS], summary["files"]))
    return SlidePrediction(adata, out_dir, files, stats)


def slide_id(path: Path) -> str:
    """A slide's default id: its file name without suffixes (.ome.tif/.ome.tiff count as one)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _score_markers(model_genes: list[str], markers: Sequence[str] | None) -> list[str]:
    """Markers of the tumour score that the model predicts ([] = no score)."""
    wanted = default_tumour_markers(model_genes) if markers is None else list(dict.fromkeys(markers))
    present = [m for m in wanted if m in set(model_genes)]
    if not present:
        if markers is not None:
            raise ConfigError(f"none of the marker genes {wanted} is predicted by the model")
        logger.warning(
            "none of the default tumour markers %s is predicted by the model: no tumour score", wanted
        )
    return present


def _predict_tiles(
    trained: TrainedModel,
    reader: SlideReader,
    level: int,
    centers: np.ndarray,
    fov_px: float,
    prep_px: int,
    *,
    bank: Bank | None,
    sample_id: str,
    k: int,
    weighting: str,
    batch_size: int,
    precision: str,
    progress: bool,
) -> np.ndarray:
    """(N, G) float32 predictions for the tiles at `centers`, read and predicted batch by batch."""
    n = len(centers)
    img_size = int(trained.model_config.img_size)
    regression = bank is None
    # the bank is indexed once for the whole slide (its own spots were removed by the caller)
    retriever = None if regression else BankRetriever(bank, k=k, weighting=weighting)
    preds = np.zeros((n, len(trained.genes)), dtype=np.float32)  # (N, G)

    def read_batch(start: int) -> np.ndarray:
        stop = min(start + batch_size, n)
        return np.stack(
            [read_tile(reader, level, cx, cy, fov_px, prep_px) for cx, cy in centers[start:stop]]
        )  # (b, prep_px, prep_px, 3)

    starts = list(range(0, n, batch_size))
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="tile-reader") as pool,
        tqdm(total=n, desc="predicting tiles", unit="tile", disable=not progress) as bar,
    ):
        pending = pool.submit(read_batch, starts[0])
        for i, start in enumerate(starts):
            tiles = pending.result()
            if i + 1 < len(starts):  # read the next batch while this one is embedded
                pending = pool.submit(read_batch, starts[i + 1])
            x = resize_uint8(tiles, img_size)  # (b, S, S, 3) uint8 tensor
            emb = embed_patches(trained, x, batch_size=batch_size, precision=precision, regression=regression)
            stop = start + len(tiles)
            if regression:
                preds[start:stop] = emb.numpy()
            else:
                preds[start:stop] = retriever.predict(emb)
            bar.update(len(tiles))
    return preds


def _write_outputs(
    out_dir: Path,
    adata: ad.AnnData,
    thumb: np.ndarray,
    mask: TissueMask,
    grid: TileGrid,
    *,
    map_genes: Sequence[str],
    score_map: bool,
    tumour_mask: bool,
) -> list[Path]:
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
    with atomic_path(out_dir / PREDICTION_FILE) as tmp:
        adata.write_h5ad(tmp)
    files.append(out_dir / PREDICTION_FILE)
    return files
