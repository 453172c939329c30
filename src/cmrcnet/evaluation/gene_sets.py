"""The gene sets of an evaluation: highly expressed (HEG) and highly variable (HVG) genes, chosen on the training
samples (strict protocol) or on each test sample (paper protocol)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.genes import GeneSelectionConfig, expression_matrix, normalized_dispersion
from cmrcnet.errors import InputFileError
from cmrcnet.evaluation.metrics import top_expressed_genes

logger = logging.getLogger(__name__)

HVG_N_BINS = (
    GeneSelectionConfig().n_bins
)  # the same binning as the gene selection that chose the model's genes


def top_dispersion_genes(log_expr: np.ndarray, gene_names: Sequence[str], *, n: int) -> list[str]:
    """The `n` genes with the highest Seurat-v1 normalised dispersion (genes.normalized_dispersion), highest first.

    Genes with no finite dispersion (never expressed, constant) are not selected, so fewer than `n` may come
    back. Ties keep the order of `gene_names`.
    """
    names = [str(g) for g in gene_names]
    score = normalized_dispersion(np.asarray(log_expr), n_bins=HVG_N_BINS)  # (G,)
    ok = np.isfinite(score)
    order = np.argsort(np.where(ok, -score, np.inf), kind="stable")
    return [names[i] for i in order[: min(n, int(ok.sum()))]]


def select_heg_hvg(log_expr: np.ndarray, genes: list[str], n_top: int) -> tuple[list[str], list[str]]:
    """(HEG, HVG) of `genes` on the given spots."""
    return top_expressed_genes(log_expr, genes, n=n_top), top_dispersion_genes(log_expr, genes, n=n_top)


def training_selection(
    dataset: PreparedDataset, samples: list[str], genes: list[str], target_sum: float, n_top: int
) -> tuple[list[str], list[str], list[str]]:
    """(HEG, HVG, genes left out because absent from a training sample), computed on the training samples only."""
    absent = [s for s in samples if s not in set(dataset.sample_ids())]
    if absent:
        raise InputFileError(
            f"the strict protocol chooses HEG/HVG on the model's training samples, but {absent} are not in this "
            "dataset; evaluate against the prepared dataset the model was trained on",
            path=dataset.root,
        )
    mats, missing_any = [], set()
    for sid in samples:
        counts = dataset.read_counts(sid)
        mat, missing = expression_matrix(
            counts, genes, target_sum=target_sum, allow_missing=True, source=dataset.counts_path(sid)
        )
        mats.append(mat)  # (N_sid, G)
        missing_any |= set(missing)
    keep = [i for i, g in enumerate(genes) if g not in missing_any]
    if missing_any:
        logger.warning(
            "%d predicted genes are missing from some training samples and cannot be HEG/HVG: %s",
            len(missing_any),
            sorted(missing_any)[:10],
        )
    if not keep:
        raise InputFileError("no predicted gene is present in every training sample", path=dataset.root)
    pooled = np.concatenate(mats)[:, keep]  # (sum N, G_kept)
    heg, hvg = select_heg_hvg(pooled, [genes[i] for i in keep], n_top)
    return heg, hvg, sorted(missing_any)
