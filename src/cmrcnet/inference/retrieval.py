"""Retrieval-based prediction: find the most similar bank spots and average their measured expression.

CMRCNet (like BLEEP) never decodes expression: a query patch's prediction is a mixture of the measured profiles of
the `k` reference ("bank") spots whose expression embeddings are most cosine-similar to the patch's image
embedding (METHOD.md, step 8).

Conventions used throughout this module:

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
import warnings
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from cmrcnet.errors import ConfigError

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

WEIGHTINGS = ("mean", "similarity")  # plain average (the paper) or clamp(sims, 0)-weighted average
BACKENDS = ("exact", "faiss")
FAISS_KINDS = ("flat", "ivf", "hnsw")

DEFAULT_BANK_CHUNK = 16384  # bank rows per similarity block
DEFAULT_QUERY_CHUNK = 1024  # query rows per similarity block; block memory = query_chunk x (bank_chunk + k)
DEFAULT_AGGREGATE_CHUNK = 256  # queries per gather in `aggregate`; memory = chunk x k x G
_NORM_EPS = 1e-12


# --- small helpers ----------------------------------------------------------------------------------------
def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
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


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, features), got shape {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def clamp_k(k: int, n_bank: int) -> int:
    """Validate `k` and clamp it to the bank size (with a warning)."""
    _check_positive(k, "k")
    if n_bank < 1:
        raise ConfigError("the retrieval bank is empty; add embeddings before searching")
    if k > n_bank:
        logger.warning("k=%d exceeds the bank size %d; using k=%d", k, n_bank, n_bank)
        return n_bank
    return int(k)


def _normalise(x: torch.Tensor, device: torch.device) -> torch.Tensor:
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
    q_all = _as_tensor(queries, "queries")  # (Q, D)
    b_all = _as_tensor(bank, "bank")  # (N, D)
    _check_matrix(q_all, "queries")
    _check_matrix(b_all, "bank")
    if q_all.shape[1] != b_all.shape[1]:
        raise ValueError(
            f"queries have {q_all.shape[1]} features but the bank has {b_all.shape[1]}; "
            "were they made by the same model?"
        )
    _check_positive(chunk_size, "chunk_size")
    _check_positive(query_chunk_size, "query_chunk_size")
    n_q, n_bank = q_all.shape[0], b_all.shape[0]
    k = clamp_k(k, n_bank)
    dev = torch.device(device) if device is not None else q_all.device

    sims_out = torch.empty((n_q, k), dtype=torch.float32, device=dev)  # (Q, k)
    idx_out = torch.empty((n_q, k), dtype=torch.int64, device=dev)  # (Q, k)
    with torch.no_grad():
        for q0 in range(0, n_q, query_chunk_size):
            q = _normalise(q_all[q0 : q0 + query_chunk_size], dev)  # (Qc, D)
            run_v = torch.empty((q.shape[0], 0), dtype=torch.float32, device=dev)  # (Qc, r)
            run_i = torch.empty((q.shape[0], 0), dtype=torch.int64, device=dev)  # (Qc, r)
            for b0 in range(0, n_bank, chunk_size):
                b = _normalise(b_all[b0 : b0 + chunk_size], dev)  # (Bc, D)
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
    _check_positive(chunk_size, "chunk_size")
    return_numpy = isinstance(bank_expression, np.ndarray)
    expr = _as_tensor(bank_expression, "bank_expression")  # (N, G)
    _check_matrix(expr, "bank_expression")
    dev = expr.device
    dtype = torch.float64 if expr.dtype == torch.float64 else torch.float32
    ix = _as_tensor(idx, "idx").to(device=dev, dtype=torch.int64)  # (Q, k)
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
        s = _as_tensor(sims, "sims").to(device=dev, dtype=dtype)  # (Q, k)
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


# --- index objects ----------------------------------------------------------------------------------------
class RetrievalIndex(Protocol):
    """The tiny interface shared by `ExactIndex` and `FaissIndex`."""

    @property
    def ntotal(self) -> int: ...

    def add(self, embeddings: ArrayLike) -> None: ...

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class ExactIndex:
    """Exact cosine search with torch (`topk_cosine`); deterministic ties (lower bank index first).

    `add` may be called several times; bank indices follow the order of addition. `search` returns numpy
    arrays sims (Q, k) float32 and idx (Q, k) int64.
    """

    def __init__(
        self,
        *,
        chunk_size: int = DEFAULT_BANK_CHUNK,
        query_chunk_size: int = DEFAULT_QUERY_CHUNK,
        device: str | torch.device | None = None,
    ) -> None:
        _check_positive(chunk_size, "chunk_size")
        _check_positive(query_chunk_size, "query_chunk_size")
        self.chunk_size = chunk_size
        self.query_chunk_size = query_chunk_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._parts: list[torch.Tensor] = []
        self._dim: int | None = None

    @property
    def ntotal(self) -> int:
        """Number of bank vectors added so far."""
        return sum(p.shape[0] for p in self._parts)

    def __len__(self) -> int:
        return self.ntotal

    def add(self, embeddings: ArrayLike) -> None:
        """Append (N, D) embeddings to the bank (stored normalised, float32, on `device`)."""
        x = _as_tensor(embeddings, "embeddings")  # (N, D)
        _check_matrix(x, "embeddings")
        if self._dim is not None and x.shape[1] != self._dim:
            raise ValueError(f"embeddings have {x.shape[1]} features but the index holds {self._dim}")
        self._dim = int(x.shape[1])
        self._parts.append(_normalise(x, self.device))  # (N, D)

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k bank vectors of each (Q, D) query: sims (Q, k) float32, idx (Q, k) int64 (numpy)."""
        if not self._parts:
            raise ConfigError("the retrieval bank is empty; add embeddings before searching")
        if len(self._parts) > 1:
            self._parts = [torch.cat(self._parts, dim=0)]  # (N, D)
        q = _as_tensor(queries, "queries")  # (Q, D)
        sims, idx = topk_cosine(
            q,
            self._parts[0],
            k,
            chunk_size=self.chunk_size,
            query_chunk_size=self.query_chunk_size,
            device=self.device,
        )
        return sims.cpu().numpy(), idx.cpu().numpy()


def _import_faiss() -> Any:
    try:
        import faiss  # optional dependency, imported only when asked for
    except ImportError as exc:
        raise ConfigError(
            "the faiss backend needs the faiss package; install it with `pip install cmrcnet[faiss]` "
            "(or `pip install faiss-cpu`), or use backend='exact'"
        ) from exc
    return faiss


def _normalised_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """(R, D) float32 C-contiguous L2-normalised rows, as faiss wants them."""
    t = _as_tensor(x, name)  # (R, D)
    _check_matrix(t, name)
    return np.ascontiguousarray(_normalise(t, torch.device("cpu")).numpy(), dtype=np.float32)  # (R, D)


class FaissIndex:
    """Cosine search with faiss: inner product on L2-normalised float32 vectors.

    Kinds:
        "flat": `IndexFlatIP`, exact (tie order is faiss's).
        "ivf": `IndexIVFFlat` with `nlist` inverted lists (clamped to the number of vectors in the first `add`,
            which also trains the coarse quantiser, so it should be a representative sample) and `nprobe`
            lists visited per query. The quantiser is trained on a seeded random sample of at most
            `training_points` vectors (1e6 bank spots: build 16.0 s -> 7.2 s, recall@50 0.984 -> 0.997 at
            nprobe 12; benchmarks/results/speed.md). Approximate; may return idx -1 when fewer than k
            candidates are found.
        "hnsw": `IndexHNSWFlat` with `hnsw_m` links per node, `ef_construction` and `ef_search`. Approximate.

    `search` returns numpy arrays sims (Q, k) float32 and idx (Q, k) int64; missing neighbours have idx -1 and
    sim -inf. Raises ConfigError at construction if faiss is not installed.
    """

    def __init__(
        self,
        *,
        kind: str = "flat",
        nlist: int = 1024,
        nprobe: int = 32,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        training_points: int = 65536,
    ) -> None:
        if kind not in FAISS_KINDS:
            raise ConfigError(f"unknown faiss index kind {kind!r}; choose one of {', '.join(FAISS_KINDS)}")
        for name, value in (
            ("nlist", nlist),
            ("nprobe", nprobe),
            ("hnsw_m", hnsw_m),
            ("ef_construction", ef_construction),
            ("ef_search", ef_search),
            ("training_points", training_points),
        ):
            _check_positive(value, name)
        self._faiss = _import_faiss()
        self.kind = kind
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.training_points = training_points
        self._index: Any = None
        self._quantiser: Any = None

    @property
    def ntotal(self) -> int:
        """Number of bank vectors added so far."""
        return 0 if self._index is None else int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def _build(self, x: np.ndarray) -> Any:
        faiss = self._faiss
        dim = x.shape[1]
        if self.kind == "flat":
            return faiss.IndexFlatIP(dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            return index
        nlist = min(self.nlist, x.shape[0])
        if nlist < self.nlist:
            logger.warning(
                "nlist=%d exceeds the %d training vectors; using nlist=%d", self.nlist, x.shape[0], nlist
            )
        quantiser = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantiser, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        if x.shape[0] > self.training_points:
            pick = np.random.default_rng(0).choice(
                x.shape[0], size=max(self.training_points, nlist), replace=False
            )
            index.train(x[np.sort(pick)])
        else:
            index.train(x)
        self._quantiser = quantiser  # the IVF index does not own its quantiser; keep it alive
        return index

    def add(self, embeddings: ArrayLike) -> None:
        """Append (N, D) embeddings (normalised here); the first call builds (and for IVF trains) the index."""
        x = _normalised_numpy(embeddings, "embeddings")  # (N, D)
        if self._index is None:
            if x.shape[0] == 0:
                raise ConfigError("cannot build a faiss index from zero embeddings")
            self._index = self._build(x)
        elif x.shape[1] != self._index.d:
            raise ValueError(f"embeddings have {x.shape[1]} features but the index holds {self._index.d}")
        self._index.add(x)

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k bank vectors of each (Q, D) query: sims (Q, k) float32, idx (Q, k) int64 (numpy)."""
        k = clamp_k(k, self.ntotal)
        q = _normalised_numpy(queries, "queries")  # (Q, D)
        if q.shape[1] != self._index.d:
            raise ValueError(f"queries have {q.shape[1]} features but the index holds {self._index.d}")
        if self.kind == "ivf":
            self._index.nprobe = min(self.nprobe, self._index.nlist)
        elif self.kind == "hnsw":
            self._index.hnsw.efSearch = max(self.ef_search, k)
        sims, idx = self._index.search(q, k)  # (Q, k), (Q, k)
        sims = np.asarray(sims, dtype=np.float32)
        idx = np.asarray(idx, dtype=np.int64)
        sims[idx < 0] = -np.inf
        return sims, idx


def make_index(backend: str = "exact", **options: Any) -> RetrievalIndex:
    """Build an empty `ExactIndex` ("exact") or `FaissIndex` ("faiss") with keyword `options`."""
    if backend == "exact":
        return ExactIndex(**options)
    if backend == "faiss":
        return FaissIndex(**options)
    raise ConfigError(f"unknown retrieval backend {backend!r}; choose one of {', '.join(BACKENDS)}")


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
