"""Spot tables: the patches (uint8, resized to the model's input) and normalised expression of prepared samples,
as training, prediction and the bank read them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.genes import expression_matrix
from cmrcnet.errors import InputFileError

logger = logging.getLogger(__name__)


@dataclass
class SpotTable:
    """Spots of one or more samples, row-aligned."""

    images: torch.Tensor  # (N, S, S, 3) uint8
    expr: torch.Tensor  # (N, G) float32 log1p-normalised expression
    sample_ids: list[str]  # (N,) sample of each spot
    barcodes: list[str]  # (N,) spot id within its sample
    coords: np.ndarray  # (N, 2) spot centres (x, y) in full-resolution pixels

    def __len__(self) -> int:
        return len(self.barcodes)

    def keys(self) -> list[str]:
        """Globally unique spot keys "sample:barcode"."""
        return [f"{s}:{b}" for s, b in zip(self.sample_ids, self.barcodes, strict=True)]

    @staticmethod
    def concat(tables: Sequence[SpotTable]) -> SpotTable:
        """Rows of several tables, in order."""
        return SpotTable(
            torch.cat([t.images for t in tables]),
            torch.cat([t.expr for t in tables]),
            [s for t in tables for s in t.sample_ids],
            [b for t in tables for b in t.barcodes],
            np.concatenate([t.coords for t in tables]),
        )

    def subset(self, idx: Sequence[int] | np.ndarray) -> SpotTable:
        idx = np.asarray(idx, dtype=np.int64)
        t = torch.from_numpy(idx)
        return SpotTable(
            self.images[t],
            self.expr[t],
            [self.sample_ids[i] for i in idx],
            [self.barcodes[i] for i in idx],
            self.coords[idx],
        )


def resize_uint8(images: np.ndarray, size: int, *, chunk: int = 256) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, size, size, 3) uint8 with antialiased bilinear resampling."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.shape[1] == size and x.shape[2] == size:
        return x
    out = torch.empty((x.shape[0], size, size, 3), dtype=torch.uint8)  # (N, size, size, 3)
    for i in range(0, len(x), chunk):
        f = x[i : i + chunk].permute(0, 3, 1, 2).float()  # (n, 3, S, S)
        r = F.interpolate(f, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + chunk] = r.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # (n, size, size, 3)
    return out


def load_spot_table(
    dataset: PreparedDataset,
    sample_ids: Sequence[str],
    genes: Sequence[str] | None,
    *,
    img_size: int | None,
    target_sum: float,
    allow_missing_genes: bool = False,
    progress: bool = True,
) -> SpotTable:
    """Read patches (resized to `img_size`; None: no images) and normalised expression (`genes`; None: none)."""
    images, exprs, sids, barcodes, coords = [], [], [], [], []
    for sid in tqdm(
        list(sample_ids), desc="loading samples", unit="sample", disable=not progress, leave=False
    ):
        counts = dataset.read_counts(sid)
        if genes is None:
            exprs.append(torch.empty((counts.n_obs, 0)))
        else:
            expr, missing = expression_matrix(
                counts,
                genes,
                target_sum=target_sum,
                allow_missing=allow_missing_genes,
                source=str(dataset.counts_path(sid)),
            )
            if missing:
                logger.warning("%s: %d genes missing, filled with zeros: %s", sid, len(missing), missing[:10])
            exprs.append(torch.from_numpy(expr))
        if img_size is not None:
            patches = dataset.read_patches(sid)
            if patches.barcodes != list(counts.obs_names):
                raise InputFileError(
                    "patches and counts list different spots; prepare the sample again",
                    path=dataset.patches_path(sid),
                )
            images.append(resize_uint8(patches.img, img_size))
        sids += [sid] * counts.n_obs
        barcodes += list(counts.obs_names)
        coords.append(np.asarray(counts.obsm["spatial"], dtype=np.float64))
    img = torch.cat(images) if images else torch.empty((len(barcodes), 0, 0, 3), dtype=torch.uint8)
    return SpotTable(img, torch.cat(exprs), sids, barcodes, np.concatenate(coords))
