"""Tests for cmrcnet.inference.retrieval against a brute-force numpy reference."""

from __future__ import annotations

import logging
import sys
import warnings

import numpy as np
import pytest
import torch

from cmrcnet.errors import ConfigError
from cmrcnet.inference.retrieval import (
    ExactIndex,
    FaissIndex,
    aggregate,
    make_index,
    retrieve_expression,
    topk_cosine,
)

N_QUERIES, N_BANK, DIM, N_GENES = 23, 101, 16, 9


# --- reference and fixtures --------------------------------------------------------------------------------
def reference_topk(queries: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 brute force: full similarity matrix, stable sort (ties -> lower bank index first)."""
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    sims = qn @ bn.T  # (Q, N)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (Q, k)
    return np.take_along_axis(sims, idx, axis=1), idx


def reference_prediction(sims: np.ndarray, idx: np.ndarray, expr: np.ndarray, weighting: str) -> np.ndarray:
    """Explicit loop over queries: plain mean, or weights max(sim, 0) normalised to sum 1."""
    out = np.zeros((idx.shape[0], expr.shape[1]))
    for q in range(idx.shape[0]):
        if weighting == "mean":
            w = np.ones(idx.shape[1]) / idx.shape[1]
        else:
            w = np.maximum(sims[q], 0.0)
            w = w / w.sum()
        for j in range(idx.shape[1]):
            out[q] += w[j] * expr[idx[q, j]]
    return out


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(N_QUERIES, DIM)).astype(np.float32)
    bank = rng.normal(size=(N_BANK, DIM)).astype(np.float32)
    expr = np.log1p(rng.poisson(3.0, size=(N_BANK, N_GENES))).astype(np.float32)
    return queries, bank, expr


def tie_data() -> tuple[np.ndarray, np.ndarray]:
    """Vectors with four +-1 entries (norm exactly 2), so cosines are exact in float32 and ties are real."""
    rng = np.random.default_rng(1)

    def make(n: int) -> np.ndarray:
        x = np.zeros((n, 8), dtype=np.float32)
        for row in x:
            cols = rng.choice(8, size=4, replace=False)
            row[cols] = rng.choice([-1.0, 1.0], size=4)
        return x

    base = make(5)
    bank = base[rng.integers(0, 5, size=40)]  # (40, 8): many exact duplicates
    return make(6), bank


# --- exact top-k -------------------------------------------------------------------------------------------
def test_topk_matches_bruteforce(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    queries, bank, _ = data
    sims, idx = topk_cosine(queries, bank, 7)
    ref_sims, ref_idx = reference_topk(queries.astype(np.float64), bank.astype(np.float64), 7)
    assert sims.shape == (N_QUERIES, 7) and sims.dtype == np.float32
    assert idx.shape == (N_QUERIES, 7) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 100, 101, 1000])
@pytest.mark.parametrize("query_chunk_size", [1, 5, 23, 1024])
def test_chunked_equals_unchunked(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], chunk_size: int, query_chunk_size: int
) -> None:
    queries, bank, _ = data
    full_sims, full_idx = topk_cosine(queries, bank, 10, chunk_size=10_000, query_chunk_size=10_000)
    sims, idx = topk_cosine(queries, bank, 10, chunk_size=chunk_size, query_chunk_size=query_chunk_size)
    np.testing.assert_array_equal(idx, full_idx)
    np.testing.assert_allclose(sims, full_sims, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 40])
def test_ties_keep_lower_bank_index(chunk_size: int) -> None:
    queries, bank = tie_data()
    _, ref_idx = reference_topk(queries.astype(np.float64), bank.astype(np.float64), 12)
    sims, idx = topk_cosine(queries, bank, 12, chunk_size=chunk_size, query_chunk_size=4)
    np.testing.assert_array_equal(idx, ref_idx)
    # within a run of equal similarities the bank indices ascend
    for s_row, i_row in zip(sims, idx, strict=True):
        for j in range(len(s_row) - 1):
            assert s_row[j] > s_row[j + 1] or (s_row[j] == s_row[j + 1] and i_row[j] < i_row[j + 1])


def test_read_only_inputs_are_fine(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    queries, bank, expr = (x.copy() for x in data)
    expected = retrieve_expression(queries, bank, expr, k=4)
    for x in (queries, bank, expr):
        x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(retrieve_expression(queries, bank, expr, k=4), expected)


def test_torch_inputs_give_tensors(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    queries, bank, _ = data
    sims, idx = topk_cosine(torch.from_numpy(queries), torch.from_numpy(bank).double(), 5, chunk_size=17)
    ref_sims, ref_idx = topk_cosine(queries, bank, 5)
    assert isinstance(sims, torch.Tensor) and sims.dtype == torch.float32
    assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(sims.numpy(), ref_sims, atol=1e-6)


def test_k_larger_than_bank_is_clamped(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    queries, bank, expr = data
    with caplog.at_level(logging.WARNING, logger="cmrcnet.inference.retrieval"):
        sims, idx = topk_cosine(queries, bank[:6], 50, chunk_size=4)
    assert sims.shape == idx.shape == (N_QUERIES, 6)
    assert "k=50 exceeds the bank size 6" in caplog.text
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.tile(np.arange(6), (N_QUERIES, 1)))
    pred = retrieve_expression(queries, bank[:6], expr[:6], k=50)
    np.testing.assert_allclose(pred, np.tile(expr[:6].mean(axis=0), (N_QUERIES, 1)), atol=1e-6)


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one_raises(data: tuple[np.ndarray, np.ndarray, np.ndarray], k: int) -> None:
    queries, bank, _ = data
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        topk_cosine(queries, bank, k)


def test_bad_inputs_raise(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    queries, bank, expr = data
    with pytest.raises(ValueError, match="queries have 16 features but the bank has 8"):
        topk_cosine(queries, bank[:, :8], 3)
    bad = queries.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="queries contains NaN or infinite values"):
        topk_cosine(bad, bank, 3)
    with pytest.raises(ConfigError, match="bank is empty"):
        topk_cosine(queries, bank[:0], 3)
    with pytest.raises(ConfigError, match="chunk_size must be a positive integer"):
        topk_cosine(queries, bank, 3, chunk_size=0)
    with pytest.raises(ValueError, match="bank_emb has 101 rows but bank_expr has 100"):
        retrieve_expression(queries, bank, expr[:100])
    with pytest.raises(ConfigError, match="unknown retrieval backend 'annoy'"):
        retrieve_expression(queries, bank, expr, backend="annoy")
    with pytest.raises(ConfigError, match="unknown weighting 'softmax'"):
        retrieve_expression(queries, bank, expr, weighting="softmax")


# --- aggregation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighting", ["mean", "similarity"])
def test_retrieve_expression_matches_reference(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], weighting: str
) -> None:
    queries, bank, expr = data
    ref_sims, ref_idx = reference_topk(queries.astype(np.float64), bank.astype(np.float64), 8)
    expected = reference_prediction(ref_sims, ref_idx, expr.astype(np.float64), weighting)
    pred = retrieve_expression(queries, bank, expr, k=8, weighting=weighting, chunk_size=13)
    assert pred.shape == (N_QUERIES, N_GENES) and pred.dtype == np.float32
    np.testing.assert_allclose(pred, expected, atol=1e-5)


def test_aggregate_hand_example() -> None:
    expr = np.array([[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]])  # (3 spots, 2 genes)
    idx = np.array([[0, 1], [2, 1]])
    sims = np.array([[0.75, 0.25], [0.5, -0.2]])
    np.testing.assert_allclose(aggregate(idx, sims, expr), [[2.0, 4.0], [6.0, 8.0]])
    # weights 0.75/1.0 and 0.25/1.0; second query: max(-0.2, 0) = 0, so only spot 2 counts
    expected = [[0.75 * 0 + 0.25 * 4, 0.75 * 2 + 0.25 * 6], [8.0, 10.0]]
    np.testing.assert_allclose(aggregate(idx, sims, expr, weighting="similarity"), expected)
    assert aggregate(idx, sims, expr).dtype == np.float64
    assert aggregate(idx, sims, expr.astype(np.float32)).dtype == np.float32


def test_aggregate_non_positive_similarities_fall_back_to_mean(caplog: pytest.LogCaptureFixture) -> None:
    expr = np.array([[0.0], [4.0], [8.0]])
    idx = np.array([[0, 1], [1, 2]])
    sims = np.array([[0.0, -0.5], [0.9, 0.1]])
    with caplog.at_level(logging.WARNING, logger="cmrcnet.inference.retrieval"):
        pred = aggregate(idx, sims, expr, weighting="similarity")
    np.testing.assert_allclose(pred, [[2.0], [0.9 * 4 + 0.1 * 8]])
    assert "1 queries have no neighbour with positive similarity" in caplog.text


def test_aggregate_missing_neighbours(caplog: pytest.LogCaptureFixture) -> None:
    expr = np.array([[1.0, 2.0], [3.0, 4.0]])
    idx = np.array([[1, -1, 0], [-1, -1, -1]])
    sims = np.array([[0.5, -np.inf, 0.5], [-np.inf, -np.inf, -np.inf]])
    with caplog.at_level(logging.WARNING, logger="cmrcnet.inference.retrieval"):
        for weighting in ("mean", "similarity"):
            pred = aggregate(idx, sims, expr, weighting=weighting)
            np.testing.assert_allclose(pred[0], [2.0, 3.0])
            assert np.isnan(pred[1]).all()
    assert "1 queries have no valid neighbour" in caplog.text


def test_aggregate_errors() -> None:
    expr = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"outside \[-1, 2\]"):
        aggregate(np.array([[0, 3]]), None, expr)
    with pytest.raises(ConfigError, match="needs the similarities"):
        aggregate(np.array([[0, 1]]), None, expr, weighting="similarity")
    with pytest.raises(ValueError, match="sims has shape"):
        aggregate(np.array([[0, 1]]), np.ones((1, 3)), expr, weighting="similarity")


def test_aggregate_torch_chunked_equals_numpy(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    queries, bank, expr = data
    sims, idx = topk_cosine(queries, bank, 6)
    expected = aggregate(idx, sims, expr, weighting="similarity")
    got = aggregate(
        torch.from_numpy(idx),
        torch.from_numpy(sims),
        torch.from_numpy(expr),
        weighting="similarity",
        chunk_size=4,
    )
    assert isinstance(got, torch.Tensor) and got.shape == (N_QUERIES, N_GENES)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


# --- index objects -----------------------------------------------------------------------------------------
def test_exact_index_matches_topk(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    queries, bank, _ = data
    index = ExactIndex(chunk_size=9)
    with pytest.raises(ConfigError, match="bank is empty"):
        index.search(queries, 3)
    index.add(bank[:40])
    index.add(torch.from_numpy(bank[40:]))
    assert index.ntotal == len(index) == N_BANK
    sims, idx = index.search(torch.from_numpy(queries), 7)
    ref_sims, ref_idx = topk_cosine(queries, bank, 7)
    assert isinstance(sims, np.ndarray) and isinstance(idx, np.ndarray)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    with pytest.raises(ValueError, match="embeddings have 8 features but the index holds 16"):
        index.add(bank[:, :8])


def test_make_index() -> None:
    assert isinstance(make_index("exact", chunk_size=5), ExactIndex)
    with pytest.raises(ConfigError, match="unknown retrieval backend 'annoy'"):
        make_index("annoy")


def test_faiss_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install cmrcnet\[faiss\]"):
        FaissIndex()


@pytest.mark.extra
def test_faiss_flat_equals_exact(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    pytest.importorskip("faiss", reason='optional extra not installed: pip install -e ".[faiss]"')
    queries, bank, expr = data
    index = FaissIndex(kind="flat")
    index.add(bank)
    sims, idx = index.search(queries, 7)
    ref_sims, ref_idx = topk_cosine(queries, bank, 7)
    assert sims.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    for weighting in ("mean", "similarity"):
        np.testing.assert_allclose(
            retrieve_expression(queries, bank, expr, k=7, weighting=weighting, backend="faiss"),
            retrieve_expression(queries, bank, expr, k=7, weighting=weighting),
            atol=1e-5,
        )


@pytest.mark.extra
def test_faiss_approximate_kinds(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("faiss", reason='optional extra not installed: pip install -e ".[faiss]"')
    queries, bank, _ = data
    _, ref_idx = topk_cosine(queries, bank, 5)
    # IVF visiting every list is exhaustive, hence exact; nlist is clamped to the 101 training vectors
    with caplog.at_level(logging.WARNING, logger="cmrcnet.inference.retrieval"):
        ivf = FaissIndex(kind="ivf", nlist=200, nprobe=200)
        ivf.add(bank)
    assert "nlist=200 exceeds the 101 training vectors" in caplog.text
    np.testing.assert_array_equal(ivf.search(queries, 5)[1], ref_idx)
    # the quantiser trained on a sample of the bank: still exhaustive (and exact) with every list visited
    sampled = FaissIndex(kind="ivf", nlist=10, nprobe=10, training_points=40)
    sampled.add(bank)
    np.testing.assert_array_equal(sampled.search(queries, 5)[1], ref_idx)
    hnsw = FaissIndex(kind="hnsw", hnsw_m=8, ef_search=64)
    hnsw.add(bank)
    _, idx = hnsw.search(queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx, ref_idx, strict=True)])
    assert recall >= 0.9
    with pytest.raises(ConfigError, match="unknown faiss index kind 'lsh'"):
        FaissIndex(kind="lsh")
