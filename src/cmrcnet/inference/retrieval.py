"""Retrieval-based prediction: find the most similar bank spots and average their measured expression.

CMRCNet (like BLEEP) never decodes expression: a query patch's prediction is a mixture of the measured profiles of
the `k` reference ("bank") spots whose expression embeddings are most cosine-similar to the patch's image
embedding (METHOD.md, step 8).

Modules: `search` (exact top-k cosine), `indexes` (index objects, faiss); this one aggregates and predicts.

Conventions used throughout these modules:

- Arrays are `numpy.ndarray` or `torch.Tensor`. Functions return the type of their "main" input (documented per
  function); `ExactIndex.search` and `FaissIndex.search` always return numpy arrays.
- Cosine similarity is the inner product of L2-normalised float32 vectors. A zero vector stays zero after
  normalisation (norm clamped at 1e-12), so it has similarity 0 with everything.
- Ties (exact backend): neighbours are ordered by similarity, descending, then by bank index, ascending. Among
  equally similar bank spots the one with the lower index is kept, so results do not depend on chunk sizes,
  thread counts or devices. The faiss backend leaves tie order to faiss.
- `k` larger than the bank: `k` is clamped to the bank size and a warning is logged (a small demo bank should
  still predict); `k < 1` raises `ConfigError`.
- An index of -1 marks a missing neighbour (faiss's convention for approximate indexes that found fewer than `k`
  candidates); `aggregate` ignores such entries.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from cmrcnet.errors import ConfigError
from cmrcnet.inference.indexes import (
    BACKENDS,
    FAISS_KINDS,
    ExactIndex,
    FaissIndex,
    RetrievalIndex,
    make_index,
)
from cmrcnet.inference.search import (
    DEFAULT_AGGREGATE_CHUNK,
    DEFAULT_BANK_CHUNK,
    DEFAULT_QUERY_CHUNK,
    ArrayLike,
    as_tensor,
    check_matrix,
    check_positive,
    clamp_k,
    topk_cosine,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "DEFAULT_AGGREGATE_CHUNK",
    "DEFAULT_BANK_CHUNK",
    "DEFAULT_QUERY_CHUNK",
    "FAISS_KINDS",
    "WEIGHTINGS",
    "ArrayLike",
    "ExactIndex",
    "FaissIndex",
    "RetrievalIndex",
    "aggregate",
    "clamp_k",
    "make_index",
    "retrieve_expression",
    "topk_cosine",
]

WEIGHTINGS = ("mean", "similarity")  # plain average (the paper) or clamp(sims, 0)-weighted average


def aggregate(
    idx: ArrayLike,
    sims: ArrayLike | None,
    bank_expression: ArrayLike,
    *,
    weighting: str = "mean",
    chunk_size: int = DEFAULT_AGGREGATE_CHUNK,
) -> ArrayLike:
    """Average the neighbours' measured expression.

    Args:
        idx: (Q, k) bank indices; -1 marks a missing neighbour and is ignored.
        sims: (Q, k) cosine similarities matching `idx`; only needed for `weighting="similarity"`.
        bank_expression: (N, G) measured expression of the bank spots (log1p-normalised).
        weighting: "mean" (the paper: plain average of the valid neighbours) or "similarity": weights
            `w_j = max(sim_j, 0) / sum_l max(sim_l, 0)`. A query whose neighbours all have similarity <= 0
            falls back to the plain mean (logged). A query without any valid neighbour gets a NaN row (logged).
        chunk_size: queries per gather step; memory is `chunk_size x k x G`.

    Returns:
        (Q, G) predictions, float64 if `bank_expression` is float64 else float32; a numpy array when
        `bank_expression` is a numpy array, else a tensor on its device.
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    check_positive(chunk_size, "chunk_size")
    return_numpy = isinstance(bank_expression, np.ndarray)
    expr = as_tensor(bank_expression, "bank_expression")  # (N, G)
    check_matrix(expr, "bank_expression")
    dev = expr.device
    dtype = torch.float64 if expr.dtype == torch.float64 else torch.float32
    ix = as_tensor(idx, "idx").to(device=dev, dtype=torch.int64)  # (Q, k)
    if ix.ndim != 2:
        raise ValueError(f"idx must be 2-D (queries, k), got shape {tuple(ix.shape)}")
    n_bank = expr.shape[0]
    if ix.numel() and (int(ix.min()) < -1 or int(ix.max()) >= n_bank):
        raise ValueError(f"idx holds values outside [-1, {n_bank - 1}] for a bank of {n_bank} spots")
    valid = ix >= 0  # (Q, k)

    if weighting == "mean":
        w = valid.to(dtype)  # (Q, k)
    else:
        if sims is None:
            raise ConfigError('weighting="similarity" needs the similarities; got sims=None')
        s = as_tensor(sims, "sims").to(device=dev, dtype=dtype)  # (Q, k)
        if s.shape != ix.shape:
            raise ValueError(f"sims has shape {tuple(s.shape)} but idx has {tuple(ix.shape)}")
        w = torch.where(valid, s.clamp(min=0.0), torch.zeros((), dtype=dtype, device=dev))  # (Q, k)
        no_positive = (w.sum(dim=1) <= 0) & valid.any(dim=1)  # (Q,)
        if bool(no_positive.any()):
            logger.warning(
                "%d queries have no neighbour with positive similarity; using the plain mean for them",
                int(no_positive.sum()),
            )
            w = torch.where(no_positive[:, None], valid.to(dtype), w)  # (Q, k)
    total = w.sum(dim=1, keepdim=True)  # (Q, 1)
    empty = total[:, 0] <= 0  # (Q,)
    if bool(empty.any()):
        logger.warning("%d queries have no valid neighbour; their predictions are NaN", int(empty.sum()))
    w = w / total  # (Q, k); NaN rows for queries without neighbours

    n_q, n_genes = ix.shape[0], expr.shape[1]
    out = torch.empty((n_q, n_genes), dtype=dtype, device=dev)  # (Q, G)
    safe_ix = ix.clamp(min=0)  # (Q, k); weights of missing entries are 0
    with torch.no_grad():
        for q0 in range(0, n_q, chunk_size):
            neigh = expr[safe_ix[q0 : q0 + chunk_size]].to(dtype)  # (Qc, k, G)
            out[q0 : q0 + chunk_size] = torch.einsum("qk,qkg->qg", w[q0 : q0 + chunk_size], neigh)  # (Qc, G)
    return out.cpu().numpy() if return_numpy else out


# --- one call ---------------------------------------------------------------------------------------------
def retrieve_expression(
    query_emb: ArrayLike,
    bank_emb: ArrayLike,
    bank_expr: ArrayLike,
    k: int = 50,
    *,
    weighting: str = "mean",
    backend: str = "exact",
    chunk_size: int = DEFAULT_BANK_CHUNK,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK,
    device: str | torch.device | None = None,
    faiss_options: Mapping[str, Any] | None = None,
) -> ArrayLike:
    """Predict expression for each query by retrieval (METHOD.md, step 8).

    Args:
        query_emb: (Q, D) image embeddings of the query patches.
        bank_emb: (N, D) expression embeddings of the bank spots.
        bank_expr: (N, G) measured expression of the bank spots.
        k: neighbours per query (the paper: 50); clamped to N with a warning.
        weighting: "mean" (the paper) or "similarity" (see `aggregate`).
        backend: "exact" (torch, chunked, deterministic ties) or "faiss" (optional extra).
        chunk_size, query_chunk_size, device: exact backend only (see `topk_cosine`).
        faiss_options: keyword arguments for `FaissIndex` (kind, nlist, nprobe, ...); faiss backend only.

    Returns:
        (Q, G) predictions; a numpy array when `bank_expr` is a numpy array, else a tensor (see `aggregate`).
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown retrieval backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if faiss_options and backend != "faiss":
        raise ConfigError("faiss_options are only used with backend='faiss'")
    n_emb = int(bank_emb.shape[0])
    n_expr = int(bank_expr.shape[0])
    if n_emb != n_expr:
        raise ValueError(
            f"bank_emb has {n_emb} rows but bank_expr has {n_expr}; they must describe the same spots"
        )
    if backend == "exact":
        sims, idx = topk_cosine(
            query_emb,
            bank_emb,
            k,
            chunk_size=chunk_size,
            query_chunk_size=query_chunk_size,
            device=device,
        )
    else:
        index = FaissIndex(**dict(faiss_options or {}))
        index.add(bank_emb)
        sims, idx = index.search(query_emb, k)
    return aggregate(idx, sims, bank_expr, weighting=weighting)
