"""Tiles over a slide: the regular grid, and reading and predicting the kept tiles batch by batch."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cmrcnet.data.slide_reader import SlideReader, read_thumbnail, read_tile, resolve_slide_pixel_size
from cmrcnet.data.spots import resize_uint8
from cmrcnet.data.stain import LabStats, reinhard, whiten_black
from cmrcnet.data.tissue import TissueConfig, TissueMask, detect_tissue
from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.inference.bank import Bank
from cmrcnet.inference.confidence import NeighbourConfidence
from cmrcnet.inference.predict import BankRetriever, embed_patches
from cmrcnet.run.load import TrainedModel

THUMB_PX_PER_TILE = 8  # thumbnail pixels along a tile side (tissue-mask resolution)
THUMB_MAX_SIDE = 2048  # thumbnail never larger than this (memory and figure size)


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


def predict_tiles(
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
    stain: tuple[LabStats, LabStats] | None = None,
    white_background: bool = False,
) -> tuple[np.ndarray, NeighbourConfidence | None]:
    """(N, G) float32 predictions for the tiles at `centers`, read and predicted batch by batch, and each tile's
    retrieval confidence (None for the regression method, which retrieves nothing). `stain`: (the slide's, the
    target) colour statistics to map every tile with (`cmrcnet.data.stain.reinhard`); None: as read.
    `white_background`: make near-black background pixels white (a slide exported on black; stain normalisation
    does this too)."""
    n = len(centers)
    img_size = int(trained.model_config.img_size)
    regression = bank is None
    # the bank is indexed once for the whole slide (its own spots were removed by the caller)
    retriever = None if regression else BankRetriever(bank, k=k, weighting=weighting)
    preds = np.zeros((n, len(trained.genes)), dtype=np.float32)  # (N, G)
    conf = None if regression else NeighbourConfidence.empty(n)

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
            if stain is not None:
                tiles = reinhard(tiles, *stain)
            elif white_background:
                tiles = whiten_black(tiles)
            x = resize_uint8(tiles, img_size)  # (b, S, S, 3) uint8 tensor
            emb = embed_patches(trained, x, batch_size=batch_size, precision=precision, regression=regression)
            stop = start + len(tiles)
            if regression:
                preds[start:stop] = emb.numpy()
            else:
                preds[start:stop], part = retriever.retrieve(emb)
                conf.put(slice(start, stop), part)
            bar.update(len(tiles))
    return preds, conf


@dataclass
class SlideLayout:
    """Where the tiles of one slide are, and the slide facts recorded with the prediction."""

    slide_path: Path
    reader_kind: str
    um_per_px: float
    px_source: str
    fov_px: float
    step_px: float
    grid: TileGrid
    thumb: np.ndarray  # (h, w, 3) uint8
    thumb_ds: float
    mask: TissueMask
    rows: np.ndarray  # kept tiles' grid rows
    cols: np.ndarray
    coverage: np.ndarray  # their tissue fractions
    centers: np.ndarray  # (N, 2) full-resolution (x, y)
    prep_px: int
    level: int
    level_ds: float


def _prep_px(trained: TrainedModel) -> int:
    """Side the training patches were cut at (run.json `patch_px`), else the model's input size."""
    sizes = trained.run_info.get("patch_px") or []
    sizes = sizes if isinstance(sizes, list) else [sizes]
    return int(sizes[0]) if len(sizes) == 1 else int(trained.model_config.img_size)


def lay_tiles(
    slide_reader: SlideReader,
    trained: TrainedModel,
    pixel_size_um: float | None,
    fov_um: float,
    step_um: float,
    *,
    min_tissue: float,
    tissue: TissueConfig | None,
) -> SlideLayout:
    """Lay the model's tiles over a slide and keep those that are tissue.

    Parameters
    ----------
    slide_reader
        The open slide.
    trained
        The model (its run.json gives the side the training patches were cut at).
    pixel_size_um
        Micrometres per full-resolution pixel given by the user, or None for the slide's metadata.
    fov_um, step_um
        Tile side and grid step in micrometres.
    min_tissue
        Fraction of a tile's area that must be tissue.
    tissue
        Tissue-detection parameters (default `TissueConfig()`).

    Returns
    -------
    SlideLayout
        Pixel size, grid, thumbnail, tissue mask, the kept tiles and the pyramid level to read them from.
    """
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
            f"(tissue covers {100 * mask.fraction:.1f}% of the thumbnail, {mask.feature} threshold "
            f"{mask.threshold:.3f}); is this an H&E image?",
            path=slide_reader.path,
        )
    rows, cols, coverage = rows[keep], cols[keep], coverage[keep]
    prep_px = _prep_px(trained)
    level = slide_reader.best_level_for_downsample(fov_px / prep_px)
    return SlideLayout(
        slide_path=slide_reader.path,
        reader_kind=slide_reader.kind,
        um_per_px=um_per_px,
        px_source=px_source,
        fov_px=fov_px,
        step_px=step_px,
        grid=grid,
        thumb=thumb,
        thumb_ds=thumb_ds,
        mask=mask,
        rows=rows,
        cols=cols,
        coverage=coverage,
        centers=grid.centers(rows, cols),
        prep_px=prep_px,
        level=level,
        level_ds=float(slide_reader.level_downsamples[level]),
    )
