"""Retrieval confidence: how close a query's nearest bank spots are, and how much their expression disagrees.

Retrieval has a natural signal of how familiar a patch looks. For every query (spot or tile) predicted by
retrieval (methods cmrcnet and bleep; the regression method has no bank and no confidence):

- ``obs["retrieval_similarity"]``: the mean cosine similarity of its k retrieved bank spots, in [-1, 1]. Low
  values mean that no measured spot's expression embedding lies close to the patch's image embedding: the patch
  looks unlike the training sections (another scanner, stain, background or tissue).
- ``obs["neighbour_spread"]``: the mean over genes of the standard deviation (population, ddof=0) of the k
  neighbours' log1p expression. High values mean the neighbours disagree, so their average is less certain.

Which similarities are low is measured against a reference: when a run's bank is built, the run's validation
spots are retrieved from the bank (leaving out their own sample, or, with a single training sample, only the
validation spots themselves) and the quantiles of their similarity are written to the run folder as
``confidence_reference.json`` (`cmrcnet.inference.confidence_reference`). A slide most of whose tiles fall below
that reference's 5th percentile is flagged as unlike the training sections.

`error_correlation` measures the signal against the actual per-spot error of a prediction with measured truth.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmrcnet.atomic import write_json
from cmrcnet.inference.search import DEFAULT_AGGREGATE_CHUNK, ArrayLike, as_tensor
from cmrcnet.run.layout import CONFIDENCE_REFERENCE_FILE

logger = logging.getLogger(__name__)

SIMILARITY_KEY = "retrieval_similarity"  # obs: mean cosine similarity of the k retrieved bank spots
SPREAD_KEY = "neighbour_spread"  # obs: mean over genes of the std of the k neighbours' expression
REFERENCE_QUANTILES = (1, 5, 10, 25, 50)  # percentiles of the validation spots' similarity that are stored
LOW_PERCENTILE = 5  # a query below this percentile of the reference counts as unlike the training sections
UNLIKE_FRACTION = 0.5  # a slide with more than this fraction of tiles below it is flagged


@dataclass
class NeighbourConfidence:
    """Per-query retrieval confidence, row-aligned with the predictions."""

    similarity: np.ndarray  # (Q,) float32 mean cosine similarity of the k neighbours, in [-1, 1]
    spread: np.ndarray  # (Q,) float32 mean over genes of the neighbours' expression std

    @classmethod
    def empty(cls, n: int) -> NeighbourConfidence:
        """NaN-filled confidence for `n` queries (filled in by row blocks)."""
        return cls(np.full(n, np.nan, dtype=np.float32), np.full(n, np.nan, dtype=np.float32))

    def put(self, rows: slice | np.ndarray, other: NeighbourConfidence) -> None:
        """Write `other`'s values at `rows`."""
        self.similarity[rows] = other.similarity
        self.spread[rows] = other.spread


def neighbour_confidence(
    idx: ArrayLike,
    sims: ArrayLike,
    bank_expression: ArrayLike,
    *,
    chunk_size: int = DEFAULT_AGGREGATE_CHUNK,
) -> NeighbourConfidence:
    """Retrieval similarity and neighbour spread of each query from its search result.

    Parameters
    ----------
    idx
        (Q, k) bank indices of the neighbours; -1 marks a missing neighbour and is ignored.
    sims
        (Q, k) their cosine similarities.
    bank_expression
        (N, G) measured log1p expression of the bank spots.
    chunk_size
        Queries per gather step; memory is `chunk_size x k x G`.

    Returns
    -------
    NeighbourConfidence
        similarity (Q,) = mean of the valid neighbours' similarities; spread (Q,) = mean over genes of the
        population standard deviation of the valid neighbours' expression. NaN for a query without neighbours.
    """
    ix = as_tensor(idx, "idx").to(torch.int64)  # (Q, k)
    s = as_tensor(sims, "sims").to(device=ix.device, dtype=torch.float64)  # (Q, k)
    expr = as_tensor(bank_expression, "bank_expression").to(ix.device)  # (N, G)
    valid = ix >= 0  # (Q, k)
    n_valid = valid.sum(dim=1).to(torch.float64)  # (Q,)
    w = valid.to(torch.float64) / n_valid[:, None]  # (Q, k); NaN rows without neighbours
    similarity = (torch.where(valid, s, torch.zeros_like(s)) * w).sum(dim=1)  # (Q,)
    spread = torch.empty(ix.shape[0], dtype=torch.float64)  # (Q,)
    safe = ix.clamp(min=0)  # (Q, k)
    with torch.no_grad():
        for q0 in range(0, ix.shape[0], chunk_size):
            neigh = expr[safe[q0 : q0 + chunk_size]].to(torch.float64)  # (Qc, k, G)
            wq = w[q0 : q0 + chunk_size, :, None]  # (Qc, k, 1)
            mean = (neigh * wq).sum(dim=1, keepdim=True)  # (Qc, 1, G)
            var = (((neigh - mean) ** 2) * wq).sum(dim=1)  # (Qc, G)
            spread[q0 : q0 + chunk_size] = var.clamp(min=0).sqrt().mean(dim=1).cpu()  # (Qc,)
    return NeighbourConfidence(
        similarity.cpu().numpy().astype(np.float32).clip(-1.0, 1.0), spread.numpy().astype(np.float32)
    )


# --- the reference: similarities seen on the training sections' validation spots ---------------------------
@dataclass
class ConfidenceReference:
    """The distribution of retrieval similarity over a run's validation spots (confidence_reference.json)."""

    quantiles: dict[str, float]  # percentile ("1", "5", ...) -> similarity
    n: int  # validation spots measured
    source: str  # "other_samples" (bank without the spot's own sample) or "other_split" (bank without the
    # validation spots; a run with one training sample)
    k: int  # neighbours per query when it was measured
    fingerprint: str  # weights that made the embeddings
    extra: dict[str, Any] = field(default_factory=dict)  # mean, weighting, samples, ...

    @property
    def low(self) -> float:
        """The similarity below which a query counts as unlike the training sections (5th percentile)."""
        return float(self.quantiles[str(LOW_PERCENTILE)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "confidence_reference",
            "quantity": SIMILARITY_KEY,
            "quantiles": {k: float(v) for k, v in self.quantiles.items()},
            "n": int(self.n),
            "source": self.source,
            "k": int(self.k),
            "fingerprint": self.fingerprint,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfidenceReference:
        known = {"kind", "quantity", "quantiles", "n", "source", "k", "fingerprint"}
        return cls(
            {str(k): float(v) for k, v in data["quantiles"].items()},
            int(data["n"]),
            str(data["source"]),
            int(data["k"]),
            str(data["fingerprint"]),
            {k: v for k, v in data.items() if k not in known},
        )


def summarise_similarity(similarity: np.ndarray) -> dict[str, float]:
    """Percentiles `REFERENCE_QUANTILES` of `similarity` (NaN ignored), keyed by the percentile as text."""
    s = np.asarray(similarity, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not s.size:
        raise ValueError("no finite similarity to summarise")
    return {str(p): float(np.percentile(s, p)) for p in REFERENCE_QUANTILES}


def save_confidence_reference(reference: ConfidenceReference, run_dir: str | Path) -> Path:
    """Write RUN_DIR/confidence_reference.json atomically."""
    path = Path(run_dir) / CONFIDENCE_REFERENCE_FILE
    write_json(path, reference.to_dict())
    return path


def load_confidence_reference(
    run_dir: str | Path, *, fingerprint: str | None = None
) -> ConfidenceReference | None:
    """The run's reference, or None (logged) when the run has none (older runs) or it does not fit the model.

    Parameters
    ----------
    run_dir
        The run folder.
    fingerprint
        The loaded model's weights fingerprint; a reference measured with other weights is not used (warning).

    Returns
    -------
    ConfidenceReference or None
    """
    path = Path(run_dir) / CONFIDENCE_REFERENCE_FILE
    if not path.is_file():
        logger.info(
            "no %s in %s (an older run): confidence is not compared to a reference", path.name, run_dir
        )
        return None
    try:
        reference = ConfidenceReference.from_dict(json.loads(path.read_text()))
        reference.low  # noqa: B018 - the 5th percentile must be there
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("%s is unreadable (%s): confidence is not compared to a reference", path, exc)
        return None
    if fingerprint is not None and reference.fingerprint != fingerprint:
        logger.warning(
            "%s was measured with weights %s, not the model's %s: not used; train again or rebuild it",
            path,
            reference.fingerprint,
            fingerprint,
        )
        return None
    return reference


def fraction_below(similarity: np.ndarray, reference: ConfidenceReference) -> float:
    """Fraction of the queries whose similarity is below the reference's 5th percentile (NaN counts as below)."""
    s = np.asarray(similarity, dtype=np.float64)
    if not s.size:
        return float("nan")
    return float(np.mean(~(s >= reference.low)))


def confidence_provenance(
    confidence: NeighbourConfidence | None, reference: ConfidenceReference | None, *, k: int
) -> dict[str, Any]:
    """What `uns["cmrcnet"]` records about confidence: how it was measured and how it compares to the reference.

    Keys: "confidence" (what obs holds, or why nothing), and with a reference "confidence_reference" (the
    quantiles, n, source, k) and "fraction_below_reference_p5". Values are h5ad-safe (no None).
    """
    if confidence is None:
        return {
            "confidence": "none: the regression method retrieves nothing, so it has no retrieval confidence"
        }
    out: dict[str, Any] = {
        "confidence": f"obs[{SIMILARITY_KEY!r}] (mean cosine similarity of the {k} neighbours) and "
        f"obs[{SPREAD_KEY!r}] (mean over genes of their expression std)"
    }
    if reference is not None:
        if reference.k != k:
            logger.info(
                "confidence reference measured with k=%d, predictions use k=%d: similarities compare loosely",
                reference.k,
                k,
            )
        out["confidence_reference"] = {
            "quantiles": dict(reference.quantiles),
            "n": int(reference.n),
            "source": reference.source,
            "k": int(reference.k),
        }
        out[f"fraction_below_reference_p{LOW_PERCENTILE}"] = fraction_below(confidence.similarity, reference)
    return out


def unlike_training_warning(fraction: float, reference: ConfidenceReference, n_tiles: int) -> str | None:
    """The slide-level warning when more than `UNLIKE_FRACTION` of the tiles fall below the reference, else None."""
    if not fraction > UNLIKE_FRACTION:
        return None
    return (
        f"this slide looks unlike the training sections: {100 * fraction:.0f}% of its {n_tiles} tiles retrieve "
        f"bank spots less similar than {LOW_PERCENTILE}% of the training sections' validation spots did "
        f"(mean similarity below {reference.low:.3f}); check the pixel size, stain and scanner, and read its "
        "predictions with care"
    )


def slide_confidence_summary(
    confidence: NeighbourConfidence | None, reference: ConfidenceReference | None
) -> tuple[dict[str, Any], str | None]:
    """The "confidence" entry of a slide's summary.json, and the slide-level warning (or None).

    The entry holds the tiles' median similarity and spread and, with a reference, its 5th percentile, the
    fraction of tiles below it and the reference's source; without a retrieval bank it says so.
    """
    if confidence is None:
        return {"measured": False, "reason": "the regression method retrieves nothing: no confidence"}, None
    sim = np.asarray(confidence.similarity, dtype=np.float64)
    out: dict[str, Any] = {
        "measured": True,
        "median_similarity": float(np.nanmedian(sim)) if sim.size else None,
        "median_spread": float(np.nanmedian(confidence.spread)) if sim.size else None,
    }
    if reference is None:
        out["reference"] = None
        return out, None
    fraction = fraction_below(sim, reference)
    out.update(
        {
            "reference": f"validation spots' similarity ({reference.source}, n={reference.n}, k={reference.k})",
            f"reference_p{LOW_PERCENTILE}": reference.low,
            f"fraction_below_reference_p{LOW_PERCENTILE}": fraction,
        }
    )
    return out, unlike_training_warning(fraction, reference, len(sim))


# --- measuring the signal against actual error ---------------------------------------------------------------
def spot_errors(pred: np.ndarray, true: np.ndarray, *, error: str = "spotwise_pcc") -> np.ndarray:
    """Per-spot error of a prediction against measured expression.

    Parameters
    ----------
    pred, true
        (N, G) predicted and measured log1p expression, row-aligned.
    error
        "spotwise_pcc": 1 - Pearson correlation over genes of each spot (NaN for a constant row); "mse": mean
        squared error over genes.

    Returns
    -------
    numpy.ndarray
        (N,) float64 errors.
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"pred and true must be 2-D of the same shape, got {p.shape} and {t.shape}")
    if error == "mse":
        return ((p - t) ** 2).mean(axis=1)
    if error != "spotwise_pcc":
        raise ValueError(f"unknown error {error!r}; choose 'spotwise_pcc' or 'mse'")
    pc = p - p.mean(axis=1, keepdims=True)
    tc = t - t.mean(axis=1, keepdims=True)
    denom = np.sqrt((pc**2).sum(axis=1) * (tc**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * tc).sum(axis=1) / denom
    return 1.0 - np.where(denom > 0, r, np.nan)


def error_correlation(
    similarity: np.ndarray, pred: np.ndarray, true: np.ndarray, *, error: str = "spotwise_pcc"
) -> float:
    """Spearman correlation between per-spot retrieval similarity and per-spot prediction error.

    A useful confidence has a clearly negative value: spots that retrieve more similar bank spots are
    predicted with less error. Spots whose similarity or error is not finite are left out.

    Parameters
    ----------
    similarity
        (N,) per-spot similarity, e.g. ``pred_adata.obs["retrieval_similarity"]``.
    pred, true
        (N, G) predicted and measured log1p expression, row-aligned with `similarity` (same spots, same genes).
    error
        "spotwise_pcc" (1 - spot-wise Pearson correlation over genes, the default) or "mse" (see `spot_errors`).

    Returns
    -------
    float
        Spearman's rho (scipy.stats.spearmanr); NaN with fewer than 3 usable spots or a constant input.
    """
    from scipy.stats import spearmanr

    s = np.asarray(similarity, dtype=np.float64).ravel()
    e = spot_errors(pred, true, error=error)
    if s.shape != e.shape:
        raise ValueError(f"similarity has {s.shape[0]} values but pred has {e.shape[0]} spots")
    ok = np.isfinite(s) & np.isfinite(e)
    if ok.sum() < 3 or np.ptp(s[ok]) == 0 or np.ptp(e[ok]) == 0:
        return float("nan")
    return float(spearmanr(s[ok], e[ok]).statistic)
