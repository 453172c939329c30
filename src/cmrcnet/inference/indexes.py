"""Retrieval index objects: `ExactIndex` (torch, `topk_cosine`) and `FaissIndex` (the optional faiss extra)."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import torch

from cmrcnet.errors import ConfigError
from cmrcnet.inference.search import (
    DEFAULT_BANK_CHUNK,
    DEFAULT_QUERY_CHUNK,
    ArrayLike,
    as_tensor,
    check_matrix,
    check_positive,
    clamp_k,
    normalise_rows,
    topk_cosine,
)

logger = logging.getLogger(__name__)

BACKENDS = ("exact", "faiss")
FAISS_KINDS = ("flat", "ivf", "hnsw")


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
        check_positive(chunk_size, "chunk_size")
        check_positive(query_chunk_size, "query_chunk_size")
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
        x = as_tensor(embeddings, "embeddings")  # (N, D)
        check_matrix(x, "embeddings")
        if self._dim is not None and x.shape[1] != self._dim:
            raise ValueError(f"embeddings have {x.shape[1]} features but the index holds {self._dim}")
        self._dim = int(x.shape[1])
        self._parts.append(normalise_rows(x, self.device))  # (N, D)

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k bank vectors of each (Q, D) query: sims (Q, k) float32, idx (Q, k) int64 (numpy)."""
        if not self._parts:
            raise ConfigError("the retrieval bank is empty; add embeddings before searching")
        if len(self._parts) > 1:
            self._parts = [torch.cat(self._parts, dim=0)]  # (N, D)
        q = as_tensor(queries, "queries")  # (Q, D)
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


def normalised_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """(R, D) float32 C-contiguous L2-normalised rows, as faiss wants them."""
    t = as_tensor(x, name)  # (R, D)
    check_matrix(t, name)
    return np.ascontiguousarray(normalise_rows(t, torch.device("cpu")).numpy(), dtype=np.float32)  # (R, D)


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
            check_positive(value, name)
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
        x = normalised_numpy(embeddings, "embeddings")  # (N, D)
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
        q = normalised_numpy(queries, "queries")  # (Q, D)
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
