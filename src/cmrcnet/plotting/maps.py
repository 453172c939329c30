"""Evaluation plots: measured vs predicted expression maps over the tissue, and the per-gene PCC distribution.

matplotlib's Agg backend is chosen inside each function (never at import); every PNG is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cmrcnet.atomic import atomic_path

_PANEL_IN = 3.4  # width and height of one map panel, inches
_DPI = 100
_CMAP = "viridis"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=_DPI)
    finally:
        plt.close(fig)


def _spot_diameter(xy: np.ndarray) -> float:
    """Drawn spot diameter in plot units: 80 % of the median nearest-neighbour distance (1 for a lone spot)."""
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(xy).query(xy, k=2)  # (N, 2): self, nearest neighbour
    nearest = dist[:, 1]
    nearest = nearest[nearest > 0]
    return 0.8 * float(np.median(nearest)) if nearest.size else 1.0


def _pcc_text(pcc: float) -> str:
    return "PCC n/a (constant)" if pcc is None or not math.isfinite(pcc) else f"PCC {pcc:.3f}"


def plot_expression_maps(
    thumb: np.ndarray | None,
    thumb_scale: float | None,
    coords: np.ndarray,
    measured: np.ndarray,
    predicted: np.ndarray,
    genes: Sequence[str],
    pccs: Sequence[float],
    path: str | Path,
    *,
    title: str,
) -> None:
    """One row per gene: measured | predicted expression as coloured spots over the tissue thumbnail.

    Args:
        thumb: (h, w, 3) uint8 thumbnail, or None to draw on a blank background.
        thumb_scale: thumbnail pixels per full-resolution pixel (ignored without a thumbnail).
        coords: (N, 2) spot centres (x, y) in full-resolution pixels.
        measured, predicted: (N, len(genes)) log1p expression.
        genes, pccs: gene names and their PCC on this slide (NaN for a constant gene).
        path: the PNG to write (atomically).
        title: figure title (say "paper protocol" here when it applies).

    Both panels of a gene share one colour scale (min to max over measured and predicted).
    """
    plt = _pyplot()
    from matplotlib.collections import EllipseCollection
    from matplotlib.colors import Normalize

    genes = [str(g) for g in genes]
    measured = np.asarray(measured, dtype=np.float64).reshape(len(coords), len(genes))  # (N, n_genes)
    predicted = np.asarray(predicted, dtype=np.float64).reshape(len(coords), len(genes))  # (N, n_genes)
    if len(pccs) != len(genes):
        raise ValueError(f"got {len(pccs)} PCC values for {len(genes)} genes")
    if not genes:
        raise ValueError("no genes to plot")
    scale = float(thumb_scale) if thumb is not None and thumb_scale else 1.0
    xy = np.asarray(coords, dtype=np.float64)[:, :2] * scale  # (N, 2) in thumbnail (or full-res) pixels
    diam = _spot_diameter(xy)
    pad = diam * 1.5
    x0, x1 = xy[:, 0].min() - pad, xy[:, 0].max() + pad
    y0, y1 = xy[:, 1].min() - pad, xy[:, 1].max() + pad

    n = len(genes)
    fig, axes = plt.subplots(
        n, 2, figsize=(2 * _PANEL_IN + 0.8, n * _PANEL_IN + 0.6), squeeze=False, constrained_layout=True
    )
    for i, gene in enumerate(genes):
        values = np.concatenate([measured[:, i], predicted[:, i]])
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            hi = lo + 1e-6
        norm = Normalize(vmin=lo, vmax=hi)
        for j, (arr, label) in enumerate(((measured[:, i], "measured"), (predicted[:, i], "predicted"))):
            ax = axes[i, j]
            if thumb is not None:
                ax.imshow(thumb, interpolation="nearest")
            else:
                ax.set_facecolor("white")
            spots = EllipseCollection(
                widths=diam,
                heights=diam,
                angles=0.0,
                units="xy",
                offsets=xy,
                offset_transform=ax.transData,
                cmap=_CMAP,
                norm=norm,
                linewidths=0,
            )
            spots.set_array(arr)
            ax.add_collection(spots)
            ax.set_xlim(x0, x1)
            ax.set_ylim(y1, y0)  # image convention: y grows downwards
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{gene} {label}" + (f" ({_pcc_text(pccs[i])})" if j == 1 else ""), fontsize=9)
        fig.colorbar(spots, ax=list(axes[i]), shrink=0.8, label="log1p expression")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_pcc_distribution(per_gene_df: pd.DataFrame, path: str | Path, *, title: str) -> None:
    """Histogram of per-gene PCC, one overlaid histogram per sample when there is a `sample_id` column.

    NaN PCCs (genes constant on a slide) are left out of the histogram and of the mean, and counted in the
    legend. A dashed line marks each sample's mean PCC.
    """
    plt = _pyplot()
    if "pcc" not in per_gene_df.columns:
        raise ValueError("per_gene_df needs a 'pcc' column")
    if "sample_id" in per_gene_df.columns:
        groups = [
            (str(s), g["pcc"].to_numpy(dtype=np.float64))
            for s, g in per_gene_df.groupby("sample_id", sort=False)
        ]
    else:
        groups = [("all samples", per_gene_df["pcc"].to_numpy(dtype=np.float64))]
    bins = np.linspace(-1.0, 1.0, 41)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=_DPI)
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for k, (name, pcc) in enumerate(groups):
        ok = np.isfinite(pcc)
        colour = colours[k % len(colours)]
        n_const = int((~ok).sum())
        if ok.any():
            mean = float(pcc[ok].mean())
            label = f"{name}: mean {mean:.3f}, {int(ok.sum())} genes"
            label += f", {n_const} constant excluded" if n_const else ""
            ax.hist(pcc[ok], bins=bins, alpha=0.45 if len(groups) > 1 else 0.8, color=colour, label=label)
            ax.axvline(mean, color=colour, ls="--", lw=1.5)
        else:
            ax.plot([], [], color=colour, label=f"{name}: no usable gene ({n_const} constant)")
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_xlim(-1.0, 1.0)
    ax.set_xlabel("per-gene PCC (within slide)")
    ax.set_ylabel("genes")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save(fig, path)
