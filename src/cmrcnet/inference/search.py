"""Exact top-k cosine search with torch, chunked over queries and bank, with deterministic ties (see
`cmrcnet.inference.retrieval` for the conventions), and the checks shared by the retrieval modules."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from cmrcnet.errors import ConfigError

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

DEFAULT_BANK_CHUNK = 16384  # bank rows per similarity block
DEFAULT_QUERY_CHUNK = 1024  # query rows per similarity block; block memory = query_chunk x (bank_chunk + k)
DEFAULT_AGGREGATE_CHUNK = 256  # queries per gather in `aggregate`; memory = chunk x k x G
_NORM_EPS = 1e-12


# --- small helpers ----------------------------------------------------------------------------------------
def as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """View a numpy array or tensor as a tensor without copying when possible."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        arr = np.ascontiguousarray(x)
        with warnings.catch_warnings():
            # read-only arrays (e.g. np.load(..., mmap_mode="r")) are fine: this module never writes to inputs
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(arr)
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def check_matrix(x: torch.Tensor, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def clamp_k(k: int, n_bank: int) -> int:
    """Validate `k` and clamp it to the bank size (with a warning)."""
    check_positive(k, "k")
    if n_bank < 1:
        raise ConfigError("the retrieval bank is empty; add embeddings before searching")
    if k > n_bank:
        logger.warning("k=%d exceeds the bank size %d; using k=%d", k, n_bank, n_bank)
        return n_bank
    return int(k)


def normalise_rows(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """L2-normalise rows in float32 on `device`."""
    x = x.to(device=device, dtype=torch.float32)  # (R, D)
    return F.normalize(x, p=2.0, dim=1, eps=_NORM_EPS)  # (R, D)


def _lexicographic_topk(
    vals: torch.Tensor, k: int, idx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row by (value descending, index ascending), returned in that order.

    `vals` (R, M) float; `idx` (R, M) int64 with distinct indices per row, or None to use the column positions
    as indices. `torch.topk` picks an unspecified member of a tie group, so rows where the k-th and (k+1)-th
    largest values are equal are redone with a full stable sort; such rows are rare for real embeddings.
    Returns values (R, m) and indices (R, m), m = min(k, M).
    """
    n_cols = vals.shape[1]
    m = min(k, n_cols)
    top_v, top_pos = torch.topk(vals, min(m + 1, n_cols), dim=1, largest=True, sorted=True)  # (R, m or m+1)
    ambiguous = top_v[:, m - 1] == top_v[:, m] if top_v.shape[1] > m else None  # (R,) tie at the cut
    top_v, top_pos = top_v[:, :m].contiguous(), top_pos[:, :m].contiguous()  # (R, m)
    if ambiguous is not None and bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)  # (A,)
        sub_v = vals[rows]  # (A, M)
        if idx is None:
            pos = torch.sort(sub_v, dim=1, descending=True, stable=True).indices[:, :m]  # (A, m)
        else:
            by_index = torch.argsort(idx[rows], dim=1, stable=True)  # (A, M) index ascending
            order = torch.sort(sub_v.gather(1, by_index), dim=1, descending=True, stable=True).indices
            pos = by_index.gather(1, order[:, :m])  # (A, m) positions in `vals`
        top_v[rows], top_pos[rows] = sub_v.gather(1, pos), pos
    top_i = top_pos if idx is None else idx.gather(1, top_pos)  # (R, m)
    # order the selected entries: index ascending, then (stable) value descending
    order = torch.argsort(top_i, dim=1, stable=True)  # (R, m)
    top_v, top_i = top_v.gather(1, order), top_i.gather(1, order)
    order = torch.sort(top_v, dim=1, descending=True, stable=True).indices  # (R, m)
    return top_v.gather(1, order), top_i.gather(1, order)


# --- exact search -----------------------------------------------------------------------------------------
def topk_cosine(
    queries: ArrayLike,
    bank: ArrayLike,
    k: int = 50,
    *,
    chunk_size: int = DEFAULT_BANK_CHUNK,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK,
    device: str | torch.device | None = None,
) -> tuple[ArrayLike, ArrayLike]:
    """Exact cosine top-k of each query against the bank.

    Args:
        queries: (Q, D) query embeddings.
        bank: (N, D) bank embeddings.
        k: neighbours per query; clamped to N with a warning when larger.
        chunk_size: bank rows per block; the bank is streamed block by block and a running top-k is merged,
            so memory is bounded by `query_chunk_size x (chunk_size + k)` similarities.
        query_chunk_size: query rows per block.
        device: where to compute; default the device of `queries` when it is a tensor, else the CPU.

    Returns:
        sims (Q, k) float32 and idx (Q, k) int64, sorted by similarity descending then bank index ascending
        (ties keep the lower bank index). numpy arrays when `queries` is a numpy array, else tensors on `device`.
    """
    return_numpy = isinstance(queries, np.ndarray)
    q_all = as_tensor(queries, "queries")  # (Q, D)
    b_all = as_tensor(bank, "bank")  # (N, D)
    check_matrix(q_all, "queries")
    check_matrix(b_all, "bank")
    if q_all.shape[1] != b_all.shape[1]:
        raise ValueError(
            f"queries have {q_all.shape[1]} features but the bank has {b_all.shape[1]}; "
            "were they made by the same model?"
        )
    check_positive(chunk_size, "chunk_size")
    check_positive(query_chunk_size, "query_chunk_size")
    n_q, n_bank = q_all.shape[0], b_all.shape[0]
    k = clamp_k(k, n_bank)
    dev = torch.device(device) if device is not None else q_all.device

    sims_out = torch.empty((n_q, k), dtype=torch.float32, device=dev)  # (Q, k)
    idx_out = torch.empty((n_q, k), dtype=torch.int64, device=dev)  # (Q, k)
    with torch.no_grad():
        for q0 in range(0, n_q, query_chunk_size):
            q = normalise_rows(q_all[q0 : q0 + query_chunk_size], dev)  # (Qc, D)
            run_v = torch.empty((q.shape[0], 0), dtype=torch.float32, device=dev)  # (Qc, r)
            run_i = torch.empty((q.shape[0], 0), dtype=torch.int64, device=dev)  # (Qc, r)
            for b0 in range(0, n_bank, chunk_size):
                b = normalise_rows(b_all[b0 : b0 + chunk_size], dev)  # (Bc, D)
                s = q @ b.T  # (Qc, Bc)
                # the global top-k members inside this chunk are among the chunk's own top-k
                chunk_v, chunk_pos = _lexicographic_topk(s, k)  # (Qc, min(k, Bc))
                run_v, run_i = _lexicographic_topk(
                    torch.cat([run_v, chunk_v], dim=1), k, torch.cat([run_i, chunk_pos + b0], dim=1)
                )  # (Qc, min(k, seen))
            sims_out[q0 : q0 + q.shape[0]] = run_v
            idx_out[q0 : q0 + q.shape[0]] = run_i
    if return_numpy:
        return sims_out.cpu().numpy(), idx_out.cpu().numpy()
    return sims_out, idx_out


# --- aggregation ------------------------------------------------------------------------------------------
