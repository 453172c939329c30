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
   (and mask with a threshold), the confidence map, summary.json and report.html, each atomically.

Retrieval confidence (`cmrcnet.inference.confidence`): every tile gets obs "retrieval_similarity" and
"neighbour_spread". When the run holds confidence_reference.json, summary.json records the fraction of tiles below
the reference's 5th percentile, and more than half of the tiles below it raises a slide-level warning (logged,
in summary.json "warnings" and in report.html).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from cmrcnet.atomic import write_json
from cmrcnet.constants import CMRCNET_UNS, DEFAULT_SMOOTH, SAMPLE_KEY, SPATIAL_KEY
from cmrcnet.data.markers import default_markers, default_tumour_markers
from cmrcnet.data.slide_reader import SlideReader, open_slide
from cmrcnet.data.stain import DEFAULT_STAIN_RULE, LabStats, check_rule, describe, lab_stats, slide_target
from cmrcnet.data.tissue import TissueConfig
from cmrcnet.errors import CmrcnetError, ConfigError
from cmrcnet.inference.bank import load_bank
from cmrcnet.inference.confidence import (
    SIMILARITY_KEY,
    SPREAD_KEY,
    confidence_provenance,
    load_confidence_reference,
    slide_confidence_summary,
)
from cmrcnet.inference.export import SPATIAL_UNS, spatial_library
from cmrcnet.inference.kchoice import resolve_k
from cmrcnet.inference.predict import (
    prediction_provenance,
    resolve_stain_target,
    stain_note,
    warn_if_other_rule,
)
from cmrcnet.inference.slide_outputs import (
    CONFIDENCE_MAP_FILE,
    HEATMAP_PREFIX,
    PREDICTION_FILE,
    SCORE_MAP_FILE,
    SUMMARY_FILE,
    THUMBNAIL_FILE,
    TISSUE_MASK_FILE,
    TUMOUR_MASK_FILE,
    write_slide_outputs,
)
from cmrcnet.inference.smoothing import check_weight, smooth_neighbours
from cmrcnet.inference.tiles import SlideLayout, TileGrid, lay_tiles, predict_tiles
from cmrcnet.inference.tumour import SCORE_KEY, TUMOUR_KEY, tumour_score
from cmrcnet.reports import REPORT_FILE, slide_report
from cmrcnet.run.load import TrainedModel, load_trained_model
from cmrcnet.runtime import resolve_precision

__all__ = [
    "CONFIDENCE_MAP_FILE",
    "HEATMAP_PREFIX",
    "PREDICTION_FILE",
    "SCORE_MAP_FILE",
    "SUMMARY_FILE",
    "THUMBNAIL_FILE",
    "TISSUE_MASK_FILE",
    "TUMOUR_MASK_FILE",
    "SlidePrediction",
    "TileGrid",
    "default_map_genes",
    "model_fov_um",
    "predict_slide",
    "slide_id",
]

logger = logging.getLogger(__name__)

DEFAULT_MIN_TISSUE = 0.5  # fraction of a tile's area that must be tissue
MAX_DEFAULT_MAPS = 8  # heatmaps drawn by default (markers present in the model's genes)
N_FALLBACK_MAPS = 4  # ... else this many first genes


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


def default_map_genes(genes: Sequence[str]) -> list[str]:
    """Marker genes the model predicts (at most MAX_DEFAULT_MAPS), else its first N_FALLBACK_MAPS genes."""
    present = [g for g in default_markers(genes) if g in set(genes)]
    return present[:MAX_DEFAULT_MAPS] if present else list(genes[:N_FALLBACK_MAPS])


def _slide_stain(
    trained: TrainedModel, layout: SlideLayout, stain_normalise: bool | None, rule: str
) -> tuple[tuple[LabStats, LabStats], str] | None:
    """((the slide's colour statistics over its thumbnail's tissue pixels, what `rule` maps them onto), a line on
    what was done), or None without stain normalisation (`resolve_stain_target`)."""
    target = resolve_stain_target(trained, stain_normalise)
    if target is None:
        return None
    warn_if_other_rule(trained, rule)
    source = lab_stats(layout.thumb[layout.mask.mask])
    return (source, slide_target(source, target, rule=rule)), describe(source, target, rule)


def predict_slide(
    run_dir: str | Path,
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
    stain_normalise: bool | None = None,
    stain_rule: str = DEFAULT_STAIN_RULE,
    smooth: float = DEFAULT_SMOOTH,
) -> SlidePrediction:
    """Predict log1p expression for every tissue tile of `slide` and write the outputs into `out_dir`.

    Args:
        run_dir: run folder of a trained model (with its reference bank unless the method is regression).
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
        tissue: tissue-detection parameters (`TissueConfig`; by default objects that look like a legend, an
            inset, a label or pen ink are left out, with a warning).
        reader: slide back end ("auto", "openslide", "tifffile", "pillow").
        plots: draw the heatmap, score and confidence PNGs.
        stain_normalise: map the slide's colours onto the run's training patches before prediction
            (slide-level, `cmrcnet.data.stain`; the slide's statistics come from the tissue pixels of its
            thumbnail; black background made white). None: the default,
            `cmrcnet.constants.DEFAULT_STAIN_NORMALISE` (runs without a stain reference skip it).
        stain_rule: "contrast" (default: spreads matched, lightness kept, a colour cast corrected) or
            "reinhard" (means and spreads matched); `cmrcnet.data.stain`.
        smooth: weight of the neighbouring tiles' predictions in each tile's (`cmrcnet.inference.smoothing`;
            default 0.5, measured on held-out patients; 0: none). The tumour score is computed after it.
    """
    t_start = time.perf_counter()
    _check_options(batch_size=batch_size, min_tissue=min_tissue, step_um=step_um, smooth=smooth)
    check_rule(stain_rule)
    out_dir = Path(out_dir)
    choice = resolve_precision(precision, device)
    trained = load_trained_model(run_dir, device=device)
    fov_um = model_fov_um(trained)
    step_um = fov_um if step_um is None else float(step_um)
    model_genes = list(trained.genes)
    map_genes, score_markers = _genes_to_show(model_genes, genes, markers, threshold)
    rcfg = trained.run_config
    weighting = rcfg.retrieval.weighting if weighting is None else weighting

    with open_slide(slide, reader=reader) as slide_reader:
        sample_id = sample_id or slide_id(slide_reader.path)
        regression = trained.model_config.method == "regression"
        bank = None if regression else load_bank(run_dir, trained)
        k = None if bank is None else resolve_k(trained, bank, k)
        bank = None if bank is None else bank.without_sample(sample_id)
        layout = lay_tiles(
            slide_reader, trained, pixel_size_um, fov_um, step_um, min_tissue=min_tissue, tissue=tissue
        )
        _log_layout(sample_id, layout, slide_reader)
        resolution_warning = _resolution_note(trained, layout)
        stained = _slide_stain(trained, layout, stain_normalise, stain_rule)
        stain = None if stained is None else stained[0]
        if stained is not None:
            logger.info("%s: tiles colour-normalised to the run's stain reference (%s)", sample_id, stained[1])
        t_pred = time.perf_counter()
        preds, conf = predict_tiles(
            trained,
            slide_reader,
            layout.level,
            layout.centers,
            layout.fov_px,
            layout.prep_px,
            bank=bank,
            sample_id=sample_id,
            k=k,
            weighting=weighting,
            batch_size=batch_size,
            precision=choice.precision,
            progress=progress,
            stain=stain,
            white_background=layout.mask.feature == "brightness",
        )
        seconds_pred = time.perf_counter() - t_pred

    if smooth and len(preds) > 1:
        preds = smooth_neighbours(preds, layout.centers, weight=smooth)
    adata = _tiles_adata(preds, model_genes, sample_id, layout)
    used_markers = _add_tumour_score(adata, preds, model_genes, score_markers, threshold)
    stats = _tile_stats(layout, seconds_pred, choice.precision)
    reference = None
    if conf is not None:
        adata.obs[SIMILARITY_KEY] = conf.similarity
        adata.obs[SPREAD_KEY] = conf.spread
        reference = load_confidence_reference(run_dir, fingerprint=trained.fingerprint)
    stats["confidence"], warning = slide_confidence_summary(conf, reference)
    stats["warnings"] = [w for w in (resolution_warning, layout.mask.left_out, warning) if w]
    if warning:
        logger.warning("%s: %s", sample_id, warning)
    adata.uns[CMRCNET_UNS] = {
        **prediction_provenance(
            trained,
            bank,
            kind="slide_prediction",
            k=k,
            weighting=weighting,
            backend="exact",
            run_dir=run_dir,
            precision=choice,
        ),
        **_slide_provenance(layout, sample_id, fov_um, step_um, min_tissue, tissue),
        **confidence_provenance(conf, reference, k=k),
        "tumour_markers": used_markers,
        "tumour_threshold": float("nan") if threshold is None else float(threshold),
        "stain_normalisation": "none" if stained is None else stain_note(stain_rule, {sample_id: stained[1]}),
        "black_background": layout.mask.feature == "brightness",
        "smoothing_weight": float(smooth),
    }
    adata.uns[SPATIAL_UNS] = {sample_id: spatial_library(layout.thumb, 1.0 / layout.thumb_ds, layout.fov_px)}
    adata.obs["library_id"] = pd.Categorical([sample_id] * len(layout.rows))

    files = write_slide_outputs(
        out_dir,
        adata,
        layout.thumb,
        layout.mask,
        layout.grid,
        map_genes=map_genes if plots else [],
        score_map=plots and bool(used_markers),
        tumour_mask=plots and threshold is not None and bool(used_markers),
        confidence_map=plots and conf is not None,
    )
    stats["seconds_total"] = round(time.perf_counter() - t_start, 3)
    files += _write_summary(out_dir, adata, files, layout, run_dir, sample_id, fov_um, step_um, stats)
    return SlidePrediction(adata, out_dir, files, stats)


def _check_options(*, batch_size: int, min_tissue: float, step_um: float | None, smooth: float = 0.0) -> None:
    check_weight(smooth)
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"min_tissue must be in [0, 1], got {min_tissue}")
    if step_um is not None and not step_um > 0:
        raise ConfigError(f"step must be a positive number of micrometres, got {step_um}")


def _genes_to_show(
    model_genes: list[str],
    genes: Sequence[str] | None,
    markers: Sequence[str] | None,
    threshold: float | None,
) -> tuple[list[str], list[str]]:
    """(genes to draw heatmaps of, markers of the tumour score), each checked against the model's genes."""
    map_genes = default_map_genes(model_genes) if genes is None else list(dict.fromkeys(genes))
    unknown = [g for g in map_genes if g not in set(model_genes)]
    if unknown:
        raise ConfigError(f"genes {unknown} are not predicted by the model ({len(model_genes)} genes)")
    score_markers = _score_markers(model_genes, markers)
    if threshold is not None and not score_markers:
        raise ConfigError("a tumour threshold needs marker genes the model predicts (markers=)")
    return map_genes, score_markers


def _log_layout(sample_id: str, layout: SlideLayout, slide_reader: SlideReader) -> None:
    logger.info(
        "%s: %.4f um/px (%s); %d of %d grid tiles are tissue; tile %.1f px read at level %d (downsample %.2f)",
        sample_id,
        layout.um_per_px,
        layout.px_source,
        len(layout.rows),
        layout.grid.n_rows * layout.grid.n_cols,
        layout.fov_px,
        layout.level,
        slide_reader.level_downsamples[layout.level],
    )
    if layout.mask.feature == "brightness":
        logger.warning(
            "%s: black background: tissue is found by brightness instead of saturation, and the near-black pixels "
            "of each tile are made white like the training slides' glass",
            sample_id,
        )


RESOLUTION_RATIO = 2.0  # a slide this many times coarser or finer than the training sections gets a warning


def training_pixel_size(trained: TrainedModel) -> float | None:
    """Median pixel size (um/px) of the run's training sections (run.json; older runs: their dataset's
    metadata, when it is still there), or None."""
    sizes = trained.run_info.get("pixel_size_um")
    if sizes is None:
        try:
            from cmrcnet.data.dataset import PreparedDataset

            ds = PreparedDataset(trained.run_info["data_dir"])
            sizes = {s: ds.metadata(s).get("pixel_size_um") for s in trained.run_info.get("train_samples", [])}
        except (KeyError, OSError, CmrcnetError):
            return None
    values = [float(v) for v in sizes.values() if v]
    return float(np.median(values)) if values else None


def _resolution_note(trained: TrainedModel, layout: SlideLayout) -> str | None:
    """How a slide scanned at another resolution is handled; a warning when it differs more than 2x."""
    train_um = training_pixel_size(trained)
    if train_um is None:
        return None
    ratio = layout.um_per_px / train_um
    fov_um = layout.fov_px * layout.um_per_px
    read_px = layout.fov_px / layout.level_ds
    how = (
        f"each {fov_um:.0f} um tile is read as {read_px:.0f} px (pyramid level {layout.level}) and resized to the "
        f"training patches' {layout.prep_px} px, so a tile covers the same tissue as in training"
    )
    # detail reaching the model: pixels per tile side, capped by the training patches' side
    loss = min(fov_um / train_um, layout.prep_px) / min(read_px, layout.prep_px)
    if 1 / RESOLUTION_RATIO <= ratio <= RESOLUTION_RATIO:
        logger.info("pixel size %.3f um/px vs %.3f in training: %s", layout.um_per_px, train_um, how)
        return None
    if ratio > 1:
        message = (
            f"the slide is {ratio:.1f}x coarser than the training sections ({layout.um_per_px:.2f} vs "
            f"{train_um:.2f} um/px): {how}"
            + (f", with about {loss:.1f}x less detail than the training patches had" if loss > 1.05 else "")
            + "; expect less accurate predictions (the benchmark's B4 copy at 3.4 um/px: "
            "benchmarks/results/her2st_accuracy.md)"
        )
    else:
        message = (
            f"the slide is {1 / ratio:.1f}x finer than the training sections ({layout.um_per_px:.2f} vs "
            f"{train_um:.2f} um/px): {how}; check --pixel-size if this is unexpected"
        )
    logger.warning("%s", message)
    return message


def _tiles_adata(preds: np.ndarray, genes: list[str], sample_id: str, layout: SlideLayout) -> ad.AnnData:
    """Tiles x genes AnnData: obs sample id, grid row/col and tissue fraction; obsm["spatial"] the centres."""
    rows, cols = layout.rows, layout.cols
    adata = ad.AnnData(preds)
    adata.var_names = genes
    adata.obs_names = [f"r{r}c{c}" for r, c in zip(rows, cols, strict=True)]
    adata.obs[SAMPLE_KEY] = pd.Categorical([sample_id] * len(rows))
    adata.obs["grid_row"] = rows
    adata.obs["grid_col"] = cols
    adata.obs["tissue_fraction"] = layout.coverage.astype(np.float32)
    adata.obsm[SPATIAL_KEY] = layout.centers
    return adata


def _add_tumour_score(
    adata: ad.AnnData,
    preds: np.ndarray,
    genes: list[str],
    score_markers: list[str],
    threshold: float | None,
) -> list[str]:
    """obs[SCORE_KEY] (and obs[TUMOUR_KEY] with a threshold); returns the markers used ([] = no score)."""
    used_markers: list[str] = []
    if score_markers:
        try:
            adata.obs[SCORE_KEY], used_markers = tumour_score(preds, genes, score_markers)
        except ConfigError as exc:  # e.g. markers constant over the tiles
            if threshold is not None:
                raise
            logger.warning("no tumour score: %s", exc.problem)
        if threshold is not None:
            adata.obs[TUMOUR_KEY] = adata.obs[SCORE_KEY].to_numpy() >= threshold
    return used_markers


def _tile_stats(layout: SlideLayout, seconds_pred: float, precision: str) -> dict[str, Any]:
    """Tile counts, tissue fraction, prediction time and speed, level, reader and precision."""
    return {
        "n_grid_tiles": int(layout.grid.n_rows * layout.grid.n_cols),
        "n_tissue_tiles": len(layout.rows),
        "tissue_fraction": layout.mask.fraction,
        "seconds_predict": round(seconds_pred, 3),
        "tiles_per_second": round(len(layout.rows) / seconds_pred, 2) if seconds_pred > 0 else None,
        "level": int(layout.level),
        "level_downsample": layout.level_ds,
        "reader": layout.reader_kind,
        "precision": precision,
    }


def _slide_provenance(
    layout: SlideLayout,
    sample_id: str,
    fov_um: float,
    step_um: float,
    min_tissue: float,
    tissue: TissueConfig | None,
) -> dict[str, Any]:
    """The slide part of uns["cmrcnet"]: the file, pixel size, grid, level, thumbnail and tissue detection."""
    return {
        "slide": str(Path(layout.slide_path).resolve()),
        "sample_id": sample_id,
        "reader": layout.reader_kind,
        "pixel_size_um": layout.um_per_px,
        "pixel_size_source": layout.px_source,
        "fov_um": fov_um,
        "fov_px": layout.fov_px,
        "step_um": step_um,
        "step_px": layout.step_px,
        "grid_origin_px": layout.grid.origin_px,
        "grid_shape": [layout.grid.n_rows, layout.grid.n_cols],
        "level": int(layout.level),
        "level_downsample": layout.level_ds,
        "thumbnail_downsample": float(layout.thumb_ds),
        "min_tissue": float(min_tissue),
        "tissue": {
            **(tissue or TissueConfig()).to_dict(),
            "threshold": layout.mask.threshold,
            "otsu": layout.mask.otsu,
            "feature": layout.mask.feature,
            "left_out": layout.mask.left_out or "",
        },
    }


def _write_summary(
    out_dir: Path,
    adata: ad.AnnData,
    files: list[Path],
    layout: SlideLayout,
    run_dir: str | Path,
    sample_id: str,
    fov_um: float,
    step_um: float,
    stats: dict[str, Any],
) -> list[Path]:
    """summary.json and report.html; returns their paths."""
    summary = {
        "slide": str(layout.slide_path),
        "sample_id": sample_id,
        "model": str(run_dir),
        "pixel_size_um": layout.um_per_px,
        "pixel_size_source": layout.px_source,
        "fov_um": fov_um,
        "step_um": step_um,
        "n_genes": adata.n_vars,
        **stats,
        "files": [p.name for p in files] + [REPORT_FILE],
    }
    write_json(out_dir / SUMMARY_FILE, summary)
    return [out_dir / SUMMARY_FILE, slide_report(out_dir, summary, adata.uns[CMRCNET_UNS], summary["files"])]


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
