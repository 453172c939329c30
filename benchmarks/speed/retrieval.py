"""Section retrieval: exact and faiss top-k search in banks of 1e4-1e6 spots, and one slide batch."""

from __future__ import annotations

import gc
import math
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .common import RECALL_TARGET, TUNE_RECALL, CpuMeter, K, median, rnd, timed, wait_quiet


# ---------------------------------------------------------------------------------------------- retrieval
def mixture(n: int, centres: torch.Tensor, weights: torch.Tensor, gen: torch.Generator) -> np.ndarray:
    """n unit vectors from a Gaussian mixture: a centre (chosen with `weights`) + isotropic noise.

    Centres have norm ~1 and the noise norm ~0.75, so a point's cosine to its own centre is ~0.8 and points of
    one cluster have cosine ~0.64 with each other; different centres are nearly orthogonal.
    """
    d = centres.shape[1]
    out = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, 200_000):
        m = min(200_000, n - i)
        lab = torch.multinomial(weights, m, replacement=True, generator=gen)
        x = centres[lab] + (0.75 / math.sqrt(d)) * torch.randn(m, d, generator=gen)
        out[i : i + m] = F.normalize(x, dim=1).numpy()
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found (idx -1 never matches)."""
    return float(
        np.mean(
            [
                len(np.intersect1d(f, t, assume_unique=False)) / t.shape[0]
                for f, t in zip(found, truth, strict=True)
            ]
        )
    )


def _search_rate(index: Any, queries: np.ndarray) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    _, idx = index.search(queries, K)
    return len(queries) / (time.perf_counter() - t0), idx


class _SampledIVF:
    """faiss IVF-Flat (inner product) whose coarse quantiser is trained on a random sample of the bank.

    `FaissIndex` trains on the whole first `add`, so its build time grows with the bank; this is the knob it
    lacks. Same normalised inputs, so recall is comparable.
    """

    def __init__(self, bank: np.ndarray, nlist: int, train_per_list: int, seed: int = 0) -> None:
        import faiss

        d = bank.shape[1]
        rng = np.random.default_rng(seed)
        n_train = min(len(bank), train_per_list * nlist)
        sample = bank[np.sort(rng.choice(len(bank), n_train, replace=False))]
        self.quantiser = faiss.IndexFlatIP(d)
        self.index = faiss.IndexIVFFlat(self.quantiser, d, nlist, faiss.METRIC_INNER_PRODUCT)
        self.index.train(sample)
        self.index.add(bank)
        self.nprobe = 1
        self.n_train = n_train

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.index.nprobe = self.nprobe
        return self.index.search(queries, k)


def _tune(
    index: Any, attr: str, values: list[int], tune_q: np.ndarray, tune_truth: np.ndarray
) -> tuple[int, list]:
    """Smallest `attr` whose recall on the tuning queries reaches TUNE_RECALL (else the largest tried)."""
    sweep = []
    chosen = values[-1]
    for v in values:
        setattr(index, attr, v)
        rate, idx = _search_rate(index, tune_q)
        rec = recall_at_k(idx, tune_truth)
        sweep.append({attr: v, "queries_per_s": round(rate, 1), "recall_at_50": round(rec, 4)})
        if rec >= TUNE_RECALL:
            chosen = v
            break
    return chosen, sweep


def sec_retrieval(p: dict, out: dict) -> None:
    try:
        import faiss
    except ImportError:
        faiss = None

    from cmrcnet.inference.retrieval import DEFAULT_BANK_CHUNK, DEFAULT_QUERY_CHUNK, ExactIndex, FaissIndex

    d, nq, nt = 256, p["n_queries"], p["n_tune"]
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(p["n_centres"], d, generator=gen) / math.sqrt(d)
    weights = torch.distributions.Dirichlet(torch.ones(p["n_centres"])).sample()
    t0 = time.perf_counter()
    bank_all = mixture(max(p["banks"]), centres, weights, gen)
    queries = mixture(nq, centres, weights, gen)
    tune_q = mixture(nt, centres, weights, gen)
    out["data"] = (
        f"synthetic clustered embeddings, dimension {d}: a Gaussian mixture of {p['n_centres']} centres with "
        "Dirichlet(1) weights (uneven cluster sizes), noise norm 0.75 x centre norm (cosine to own centre ~0.8), "
        f"L2-normalised; {nq} test queries and {nt} separate tuning queries from the same mixture; the smaller "
        f"banks are prefixes of the largest (generated in {time.perf_counter() - t0:.1f} s). Uniform random "
        "vectors would make approximate search look worse than it is on real, clustered embeddings."
    )
    out["protocol"] = (
        f"k={K}. recall@{K} = mean fraction of the exact top-{K} found. nprobe/efSearch are the smallest values "
        f"reaching recall >= {TUNE_RECALL} on the tuning queries, then measured on the test queries. Build = "
        f"constructing the index from the bank (normalising, training, adding). faiss threads: "
        f"{faiss.omp_get_max_threads() if faiss else 'n/a'}; torch threads: {torch.get_num_threads()}"
    )
    out["faiss_version"] = faiss.__version__ if faiss else None
    if faiss is None:
        out["faiss_skipped"] = 'faiss is not installed (pip install "cmrcnet[faiss]"): exact search only'
        print(f"  {out['faiss_skipped']}", flush=True)
    rows = []
    for n in p["banks"]:
        bank = bank_all[:n]
        before = wait_quiet()
        meter = CpuMeter()
        print(f"  bank {n}", flush=True)

        # exact, chunked (the default backend); its result is the ground truth
        t0 = time.perf_counter()
        exact = ExactIndex()
        exact.add(bank)
        exact_build = time.perf_counter() - t0
        exact_rate, truth = _search_rate(exact, queries)

        def add(
            method: str, build_s: float | None, rate: float, idx: np.ndarray | None, n=n, truth=truth, **extra
        ) -> dict:
            row = {
                "bank_size": n,
                "method": method,
                "build_seconds": rnd(build_s),
                "queries_per_s": round(rate, 1),
            }
            if idx is not None:
                row["recall_at_50"] = round(recall_at_k(idx, truth), 4)
            row.update(extra)
            rows.append(row)
            print(
                f"    {method:40s} build {row['build_seconds']} s, {rate:8.1f} q/s, recall {row.get('recall_at_50')}",
                flush=True,
            )
            return row

        add("exact torch chunked (ExactIndex)", exact_build, exact_rate, None, recall_at_50=1.0,
            options={"chunk_size": DEFAULT_BANK_CHUNK, "query_chunk_size": DEFAULT_QUERY_CHUNK})  # fmt: skip
        del exact
        gc.collect()
        if faiss is None:
            continue
        # exact in faiss (BLAS + heap); also the tuning ground truth
        t0 = time.perf_counter()
        flat = FaissIndex(kind="flat")
        flat.add(bank)
        build = time.perf_counter() - t0
        rate, idx = _search_rate(flat, queries)
        add("faiss flat (FaissIndex kind=flat)", build, rate, idx)
        _, tune_truth = flat.search(tune_q, K)
        del flat
        gc.collect()

        # IVF through src's FaissIndex (quantiser trained on the whole bank, capped by faiss at 256 points per
        # list): its defaults, then nprobe tuned; where that training would take minutes (large nlist on a big
        # bank) only the sampled-training variant is built; for big banks the default nlist is also rebuilt with
        # sampled training to show the build time it saves
        probes = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128]
        for nlist in sorted({1024, _pow2(4 * math.sqrt(n)), _pow2(math.sqrt(n))}):
            if nlist > n // 39 and nlist != 1024:  # faiss wants >= 39 training points per list
                continue
            full_training = min(n, 256 * nlist) * nlist <= 300_000 * 1024
            if full_training:
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ivf = FaissIndex(kind="ivf", nlist=nlist)
                    ivf.add(bank)
                build = time.perf_counter() - t0
                if nlist == 1024:
                    rate, idx = _search_rate(ivf, queries)
                    opts = {"nlist": ivf._index.nlist, "nprobe": ivf.nprobe}
                    add("FaissIndex ivf defaults", build, rate, idx, options=opts)
                nprobe, sweep = _tune(ivf, "nprobe", probes, tune_q, tune_truth)
                ivf.nprobe = nprobe
                rate, idx = _search_rate(ivf, queries)
                add(f"FaissIndex ivf nlist={nlist} tuned", build, rate, idx,
                    options={"nlist": nlist, "nprobe": nprobe}, tuning=sweep)  # fmt: skip
                del ivf
                gc.collect()
            if n >= 100_000 and (nlist == 1024 or not full_training):
                t0 = time.perf_counter()
                sampled = _SampledIVF(bank, nlist, 64)  # 64 training points per list
                build = time.perf_counter() - t0
                if full_training:
                    sampled.nprobe, sweep = nprobe, None  # same nprobe as the fully trained index
                else:
                    sampled.nprobe, sweep = _tune(sampled, "nprobe", probes, tune_q, tune_truth)
                rate, idx = _search_rate(sampled, queries)
                add(f"faiss ivf nlist={nlist}, sampled training", build, rate, idx, tuning=sweep,
                    options={"nlist": nlist, "nprobe": sampled.nprobe, "training_points": sampled.n_train})  # fmt: skip
                del sampled
                gc.collect()

        if n <= p["hnsw_max_bank"]:
            t0 = time.perf_counter()
            hnsw = FaissIndex(kind="hnsw")
            hnsw.add(bank)
            build = time.perf_counter() - t0
            rate, idx = _search_rate(hnsw, queries)
            opts = {"hnsw_m": hnsw.hnsw_m, "ef_construction": hnsw.ef_construction}
            add("FaissIndex hnsw defaults", build, rate, idx, options={**opts, "ef_search": hnsw.ef_search})
            ef, sweep = _tune(hnsw, "ef_search", [50, 64, 96, 128, 192, 256, 512], tune_q, tune_truth)
            hnsw.ef_search = ef
            rate, idx = _search_rate(hnsw, queries)
            add("FaissIndex hnsw tuned", build, rate, idx, options={**opts, "ef_search": ef}, tuning=sweep)
            del hnsw
            gc.collect()
        else:
            rows.append({"bank_size": n, "method": "FaissIndex hnsw", "skipped": "build too slow on 2 cores "
                         f"(run for banks <= {p['hnsw_max_bank']}; scale its build time by ~n log n)"})  # fmt: skip
        others = round(meter.stop(), 2)
        for r in rows:
            if r.get("bank_size") == n and "queries_per_s" in r:
                r["speedup_vs_exact_torch"] = round(r["queries_per_s"] / exact_rate, 2)
                r["others_cpu_cores"], r["others_cpu_cores_before"] = others, round(before, 2)
    out["results"] = rows
    out["best_approximate"] = {}
    for n in p["banks"]:
        ok = [r for r in rows if r["bank_size"] == n and "recall_at_50" in r and r["recall_at_50"] >= RECALL_TARGET
              and not r["method"].startswith(("exact", "faiss flat"))]  # fmt: skip
        if ok:
            best = max(ok, key=lambda r: r["queries_per_s"])
            out["best_approximate"][str(n)] = {
                k: best.get(k)
                for k in (
                    "method",
                    "options",
                    "queries_per_s",
                    "recall_at_50",
                    "build_seconds",
                    "speedup_vs_exact_torch",
                )
            }
    out["slide_batch_retrieval"] = slide_batch_retrieval(bank_all, [n for n in p["banks"] if n <= 100_000])


def _pow2(x: float) -> int:
    return int(2 ** round(math.log2(max(1.0, x))))


def slide_batch_retrieval(
    bank_all: np.ndarray, sizes: list[int], genes: int = 250, batch: int = 64
) -> list[dict]:
    """Seconds for one 64-tile batch: through `predict_from_embeddings` (the bank checked, normalised and indexed
    for every call, what predict-slide did per batch before), against `BankRetriever.predict` on a retriever
    built once per slide (what predict-slide does now)."""
    from cmrcnet.inference.bank import Bank
    from cmrcnet.inference.predict import BankRetriever, predict_from_embeddings

    rows = []
    rng = np.random.default_rng(0)
    q = torch.from_numpy(bank_all[-batch:].copy())
    for n in sizes:
        emb = torch.from_numpy(bank_all[:n].copy())
        expr = torch.from_numpy(rng.random((n, genes), dtype=np.float32))
        keys = [f"s{i % 20}:{i}" for i in range(n)]
        bank = Bank(emb, expr, keys, [f"s{i}" for i in range(20)], [f"g{j}" for j in range(genes)], "bench")
        call = lambda bank=bank: predict_from_embeddings(q, ["slide"] * batch, bank, k=K, weighting="mean")  # noqa: E731
        call()
        per_call = median([timed(call) for _ in range(3)])
        t0 = time.perf_counter()
        retriever = BankRetriever(bank, k=K, exclude_sample="slide")
        build = time.perf_counter() - t0

        def direct(retriever=retriever) -> None:
            retriever.predict(q)

        direct()
        per_direct = median([timed(direct) for _ in range(3)])
        rows.append({
            "bank_size": n, "genes": genes, "batch": batch,
            "predict_from_embeddings_ms": round(1e3 * per_call, 1),
            "bank_retriever_build_ms": round(1e3 * build, 1),
            "bank_retriever_predict_ms": round(1e3 * per_direct, 1),
            "tiles_per_s_ceiling_from_retrieval": round(batch / per_direct, 1),
        })  # fmt: skip
        print(f"    slide batch retrieval, bank {n}: {rows[-1]}", flush=True)
    return rows
