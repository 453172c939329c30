"""Expression normalisation and gene selection.

Normalisation: library-size scaling to a fixed `target_sum` (default 1e4) then log1p. A fixed target, rather
than scanpy's per-dataset median, keeps values comparable between training slides and a test slide sequenced
at another depth (her2st B4 has ~15x fewer UMI per spot than patient C).

Gene selection (EVALUATION.md):
- strict (default): the top-N highly variable genes UNION the top-M highly expressed genes (highest mean log1p
  expression), both ranked over every gene detected in the training samples only (default N = 250, M = 100).
  The panel therefore holds the HEG-50 and HVG-50 that evaluation chooses on the same training spots, so those
  sets are chosen from all detected genes, not from a pre-filtered HVG list;
- paper: CMRCNet's union over all samples (test samples included) of each sample's top-1000 HVGs; this looks
  at the test data and is only for reproducing the paper; it is labelled as such wherever it is used.

Highly variable genes use the Seurat v1 dispersion recipe (as scanpy's flavor="seurat"): on normalised counts
(expm1 of log1p values) compute each gene's mean and dispersion var/mean, take logs, bin genes into 20 bins
of log mean, and z-score the log dispersion within its bin. Genes are ranked by that normalised dispersion.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cmrcnet.errors import ConfigError, InputFileError

logger = logging.getLogger(__name__)

GeneMode = Literal["strict", "paper"]
GENE_MODES: tuple[GeneMode, ...] = ("strict", "paper")  # "paper" leaks test genes (labelled everywhere)


@dataclass
class GeneSelectionConfig:
    """How the model's gene list is chosen."""

    mode: GeneMode = (
        "strict"  # "strict": HVGs of training samples only; "paper": union of per-sample HVGs (leaks)
    )
    n_top: int = 250  # strict: number of highly variable genes
    n_top_expressed: int = 100  # strict: number of highly expressed genes (mean log1p) added; 0 for none
    per_sample_top: int = 1000  # paper: top HVGs taken from each sample before the union
    min_spot_fraction: float = 0.05  # genes detected in fewer training spots than this fraction are ignored
    n_bins: int = 20  # bins of mean expression for the dispersion z-score
    target_sum: float = 1e4  # library size every spot is scaled to before log1p
    include: list[str] = field(default_factory=list)  # genes always added (e.g. markers) when all samples have them
    # also add the tumour marker panel (data.markers.default_tumour_markers) that every selection sample measures,
    # so the tumour score of predict-slide works out of the box; panels a sample lacks are left out silently
    tumour_markers: bool = True

    def validate(self) -> None:
        if self.mode not in GENE_MODES:
            raise ConfigError(f"gene selection mode must be 'strict' or 'paper', got {self.mode!r}")
        if self.n_top < 1 or self.per_sample_top < 1:
            raise ConfigError("gene selection needs n_top >= 1 and per_sample_top >= 1")
        if self.n_top_expressed < 0:
            raise ConfigError(f"n_top_expressed must be >= 0, got {self.n_top_expressed}")
        if not 0.0 <= self.min_spot_fraction < 1.0:
            raise ConfigError(f"min_spot_fraction must be in [0, 1), got {self.min_spot_fraction}")
        if not self.target_sum > 0:
            raise ConfigError(f"target_sum must be positive, got {self.target_sum}")


@dataclass
class GeneList:
    """The ordered genes a model predicts, with how and from which samples they were chosen."""

    genes: list[str]
    mode: GeneMode
    selected_on: list[str]  # sample ids whose expression was looked at
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> GeneList:
        return cls(list(d["genes"]), d["mode"], list(d["selected_on"]), dict(d.get("config", {})))


def library_sizes(counts: ad.AnnData) -> np.ndarray:
    """Total counts per spot over all genes, (N,) float64."""
    x = counts.X
    return np.asarray(x.sum(axis=1)).reshape(-1).astype(np.float64)


def normalize_log1p(
    counts: ad.AnnData, genes: Sequence[str] | None = None, *, target_sum: float = 1e4
) -> np.ndarray:
    """log1p(counts / library size * target_sum) for `genes` (all genes when None), as (N, G) float32.

    Library sizes always use all genes of the spot. Spots with zero total counts stay all-zero.
    """
    lib = library_sizes(counts)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)  # (N,)
    x = counts.X if genes is None else counts[:, list(genes)].X
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return np.log1p(x.astype(np.float64) * scale[:, None]).astype(np.float32)  # (N, G)


def expression_matrix(
    counts: ad.AnnData,
    genes: Sequence[str],
    *,
    target_sum: float = 1e4,
    allow_missing: bool = False,
    source: str = "sample",
) -> tuple[np.ndarray, list[str]]:
    """Normalised log1p expression of exactly `genes`, in that order; returns (matrix (N, G), missing genes).

    Genes absent from `counts` raise InputFileError unless `allow_missing`, in which case they are filled
    with zeros and returned in the missing list so the caller can report them.
    """
    present = set(counts.var_names)
    missing = [g for g in genes if g not in present]
    if missing and not allow_missing:
        raise InputFileError(
            f"{len(missing)} of the model's {len(genes)} genes are missing from this sample "
            f"(first: {missing[:5]}); pass allow_missing_genes=True to fill them with zeros",
            path=source,
        )
    keep = [g for g in genes if g in present]
    sub = normalize_log1p(counts, keep, target_sum=target_sum)  # (N, G_present)
    if not missing:
        return sub, []
    out = np.zeros((counts.n_obs, len(genes)), dtype=np.float32)  # (N, G)
    pos = {g: i for i, g in enumerate(genes)}
    out[:, [pos[g] for g in keep]] = sub
    return out, missing


def normalized_dispersion(log_expr: np.ndarray, *, n_bins: int = 20) -> np.ndarray:
    """Seurat-v1 normalised dispersion per gene of (N, G) log1p-normalised expression; NaN for unusable genes."""
    x = np.expm1(log_expr.astype(np.float64))  # back to normalised counts
    mean = x.mean(axis=0)
    var = x.var(axis=0, ddof=1) if x.shape[0] > 1 else np.zeros_like(mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(var / mean)
        log_mean = np.log1p(mean)
    disp[~np.isfinite(disp)] = np.nan
    out = np.full_like(mean, np.nan)
    ok = np.isfinite(disp)
    if not ok.any():
        return out
    edges = np.linspace(log_mean[ok].min(), log_mean[ok].max() + 1e-12, n_bins + 1)
    bins = np.clip(np.digitize(log_mean, edges) - 1, 0, n_bins - 1)
    for b in np.unique(bins[ok]):
        members = ok & (bins == b)
        d = disp[members]
        sd = d.std(ddof=1) if d.size > 1 else 0.0
        # a bin with a single gene (or no spread) has no scale: Seurat sets its z-score to 1 so it is kept
        out[members] = (d - d.mean()) / sd if sd > 0 else 1.0
    return out


def _common_genes(adatas: Mapping[str, ad.AnnData]) -> list[str]:
    """Genes present in every sample, in the order of the first one."""
    items = list(adatas.values())
    common = set(items[0].var_names)
    for a in items[1:]:
        common &= set(a.var_names)
    return [g for g in items[0].var_names if g in common]


def _pooled_log1p(adatas: Mapping[str, ad.AnnData], genes: list[str], cfg: GeneSelectionConfig) -> np.ndarray:
    """(sum N, G) log1p-normalised expression of `genes` over the pooled spots of `adatas`."""
    return np.concatenate([normalize_log1p(a, genes, target_sum=cfg.target_sum) for a in adatas.values()])


def _ranked(score: np.ndarray, genes: list[str], n: int) -> list[str]:
    """The `n` genes of highest finite `score`, highest first (ties keep the gene order)."""
    order = np.argsort(np.where(np.isfinite(score), -score, np.inf), kind="stable")
    return [genes[i] for i in order[: min(n, int(np.isfinite(score).sum()))]]


def _top_hvg(
    adatas: Mapping[str, ad.AnnData], genes: list[str], n: int, cfg: GeneSelectionConfig,
    log_expr: np.ndarray | None = None,
) -> list[str]:
    log_expr = _pooled_log1p(adatas, genes, cfg) if log_expr is None else log_expr
    detected = (log_expr > 0).mean(axis=0) >= cfg.min_spot_fraction  # (G,)
    score = normalized_dispersion(log_expr, n_bins=cfg.n_bins)
    score[~detected] = np.nan
    return _ranked(score, genes, n)


def _top_expressed(log_expr: np.ndarray, genes: list[str], n: int, cfg: GeneSelectionConfig) -> list[str]:
    """The `n` detected genes of highest mean log1p expression over the pooled spots (HEG)."""
    detected = (log_expr > 0).mean(axis=0) >= cfg.min_spot_fraction  # (G,)
    score = np.where(detected, log_expr.astype(np.float64).mean(axis=0), np.nan)  # (G,)
    return _ranked(score, genes, n)


def select_genes(
    train: Mapping[str, ad.AnnData],
    *,
    config: GeneSelectionConfig | None = None,
    all_samples: Mapping[str, ad.AnnData] | None = None,
) -> GeneList:
    """Choose the model's genes.

    Args:
        train: raw-count AnnData of the training samples, by sample id.
        config: selection settings (strict by default).
        all_samples: every sample including test ones; used (and required) only in paper mode.
    """
    cfg = config or GeneSelectionConfig()
    cfg.validate()
    if not train:
        raise ConfigError("gene selection needs at least one training sample")
    if cfg.mode == "strict":
        genes = _common_genes(train)
        log_expr = _pooled_log1p(train, genes, cfg)  # (sum N, G)
        chosen = _top_hvg(train, genes, cfg.n_top, cfg, log_expr)
        if cfg.n_top_expressed:
            hvg = set(chosen)
            chosen += [g for g in _top_expressed(log_expr, genes, cfg.n_top_expressed, cfg) if g not in hvg]
        looked_at = list(train)
    else:
        if all_samples is None:
            raise ConfigError("paper-mode gene selection needs all samples (it reads the test samples too)")
        genes = _common_genes(all_samples)
        union: set[str] = set()
        for sid, a in all_samples.items():
            union |= set(_top_hvg({sid: a}, genes, cfg.per_sample_top, cfg))
        chosen = [g for g in genes if g in union]
        looked_at = list(all_samples)
        logger.warning("paper protocol: genes chosen from all samples, including test samples %s", looked_at)
    extra = [g for g in cfg.include if g in set(genes) and g not in set(chosen)]
    absent = [g for g in cfg.include if g not in set(genes)]
    if absent:
        logger.warning("genes to include that not every selection sample measures (left out): %s", absent)
    if cfg.tumour_markers:
        from cmrcnet.data.markers import default_tumour_markers

        panel = [g for g in default_tumour_markers(genes) if g in set(genes)]
        added = [g for g in panel if g not in set(chosen) and g not in set(extra)]
        extra += added
        if added:
            logger.info("tumour markers added to the genes (for the tumour score): %s", added)
    chosen = chosen + extra
    if not chosen:
        raise ConfigError("gene selection found no variable gene expressed in enough spots")
    logger.info("selected %d genes (%s mode) from samples %s", len(chosen), cfg.mode, looked_at)
    return GeneList(chosen, cfg.mode, looked_at, asdict(cfg))
