"""Speed of training, patch encoding, retrieval and whole-slide prediction, each against the machine's limit.

    python benchmarks/speed.py [--quick] [--sections peak,train,inference,retrieval,slide] [--out PATH]

Sections (each records machine, commit, command, wall time and the load average before and after):

- peak: the measured fp32 and bf16 matmul peak (square matmuls, `_machine.matmul_peak_gflops`), the rate of the
  paper ViT's own GEMM shapes, and the rate of an int8 dynamically quantised Linear layer.
- train: a full cmrcnet training step (forward, backward, AdamW) per preset at batch 64 on random inputs, fp32
  and bf16: spots/s, analytic FLOPs per spot (`model_flops_per_spot`), achieved GFLOP/s and fraction of the
  precision's matmul peak, plus variants that look for the gaps (the trainer's input pipeline and EMA, 1 vs 2
  threads, contiguous vs channels-last input, the SDPA math kernel instead of the fused one, torch.compile in a
  fresh process with a cold inductor cache), each with its speed-up over the baseline.
- inference: `CMRCNet.embed_images` (eval, no grad) patches/s per preset, batch and precision, with encoder
  FLOPs per patch, plus variants (threads, memory format, SDPA kernel, bf16 weights instead of autocast, int8
  dynamic quantisation of the Linear layers, torch.compile, and `embed_patches` from uint8 as `predict` runs it).
- retrieval: top-50 cosine search of 1000 queries in banks of 1e4, 1e5 and 1e6 spots of dimension 256 drawn from
  a Gaussian mixture (clustered like real embeddings, not uniform): exact chunked torch search (`ExactIndex`)
  against `FaissIndex` (flat, IVF, HNSW) with nprobe / efSearch tuned on separate queries so that recall@50
  against exact search is >= 0.95, plus IVF trained on a sample (a knob `FaissIndex` lacks), and the cost of
  one slide batch's retrieval through `predict_from_embeddings`.
- slide: `cmrcnet predict-slide` in a child process on synthetic pyramidal TIFFs of two sizes (4x the area) with
  1-epoch paper- and cpu-preset runs trained on synthetic data: tiles/s and the child's peak RSS.

`--quick` runs every section at toy sizes (tiny preset, small banks and slides, no torch.compile) in about a
minute and writes results/speed_quick.json, so the committed full results are not overwritten. Results of the
sections run are merged into an existing results file (other sections are kept), and the .md next to it is
rewritten from the merged JSON. A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))  # benchmark the working tree, installed or not
from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.flops import model_flops_per_spot
from cmrcnet.runtime import autocast_context

from _machine import git_commit, machine_info, matmul_peak_gflops

RESULTS = HERE / "results" / "speed.json"
QUICK_RESULTS = HERE / "results" / "speed_quick.json"
SECTIONS = ("peak", "train", "inference", "retrieval", "slide")
RESULT_MARK = "SPEED_RESULT "  # prefix of the JSON line a worker process prints
CPU = torch.device("cpu")

FULL = dict(
    peak_sizes=(1024, 2048, 4096),
    peak_repeats=5,
    train_presets=("paper", "cpu"),
    train_batch=64,
    train_steps=3,
    train_warmup=1,
    compile_warmup=2,
    genes=250,
    infer_presets=("paper", "cpu"),
    infer_batches=(64, 128),
    infer_steps=3,
    banks=(10_000, 100_000, 1_000_000),
    n_queries=1000,
    n_tune=200,
    n_centres=300,
    hnsw_max_bank=100_000,
    slide_presets=("paper", "cpu"),
    slide_sides=(4096, 8192),
    slide_patch_px=224,
    compile=True,
    compile_timeout_s=420,
    quick=False,
)
QUICK = dict(
    FULL,
    peak_sizes=(512,),
    peak_repeats=2,
    train_presets=("tiny",),
    train_batch=16,
    train_steps=2,
    genes=50,
    infer_presets=("tiny",),
    infer_batches=(32,),
    infer_steps=2,
    banks=(2_000, 20_000),
    n_queries=200,
    n_tune=100,
    n_centres=50,
    hnsw_max_bank=20_000,
    slide_presets=("tiny",),
    slide_sides=(1024, 2048),
    slide_patch_px=32,
    compile=False,
    quick=True,
)

K = 50  # retrieval neighbours (the paper's k)
RECALL_TARGET = 0.95
TUNE_RECALL = 0.97  # tuned on separate queries with a margin, so the test recall stays >= RECALL_TARGET


# ---------------------------------------------------------------------------------------------- helpers
def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def command_line() -> str:
    return "python " + shlex.join(["benchmarks/speed.py", *sys.argv[1:]])


@contextlib.contextmanager
def section(name: str, results: dict) -> Iterator[dict]:
    """Collect one section's results with its wall time and the load average around it."""
    out: dict[str, Any] = {
        "command": command_line(),
        "git_commit": git_commit(),
        "machine": machine_info(),
        "load_average_before": loadavg(),
    }
    print(f"== {name} (load {out['load_average_before']})", flush=True)
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["wall_seconds"] = round(time.perf_counter() - t0, 1)
        out["load_average_after"] = loadavg()
        results[name] = out
        print(f"== {name} done in {out['wall_seconds']} s (load {out['load_average_after']})", flush=True)


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sdpa_context(kind: str) -> contextlib.AbstractContextManager:
    """'default': torch's choice (the fused flash kernel on CPU); 'math': the unfused reference kernel."""
    if kind == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rnd(x: float | None, nd: int = 2) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), nd)


def run_worker(spec: dict, timeout_s: int) -> dict:
    """Run one measurement in a fresh process (own inductor cache dir: a cold torch.compile)."""
    with tempfile.TemporaryDirectory(prefix="speed_worker_") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s} s", "process_seconds": timeout_s}
        seconds = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "process_seconds": seconds}
    out = json.loads(lines[-1][len(RESULT_MARK) :])
    out["process_seconds"] = seconds
    return out


# ---------------------------------------------------------------------------------------------- FLOPs
def embed_flops_per_patch(cfg: ModelConfig) -> int:
    """Matmul FLOPs of `embed_images` for one patch (ViT + image projection head), counted as in flops.py.

    `model_flops_per_spot(cfg, training=False)` is the forward pass of the whole loss (spot head and
    reconstruction branch included), which is more than encoding a patch needs.
    """
    t, w, hidden = cfg.n_tokens, cfg.width, int(cfg.width * cfg.mlp_ratio)

    def lin(n: int, a: int, b: int) -> int:
        return 2 * n * a * b

    block = lin(t, w, 3 * w) + 4 * t * t * w + lin(t, w, w) + lin(t, w, hidden) + lin(t, hidden, w)
    flops = lin(cfg.n_patches, 3 * cfg.patch_size**2, w) + cfg.depth * block
    return flops + lin(1, w, cfg.proj_dim) + lin(1, cfg.proj_dim, cfg.proj_dim)


def counted_flops(fn: Callable[[], Any]) -> int:
    """Matmul and convolution FLOPs torch's FlopCounterMode sees (it does not count CPU flash attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- peak
def sec_peak(p: dict, out: dict) -> dict:
    peak = {
        "fp32": matmul_peak_gflops(torch.float32, sizes=p["peak_sizes"], repeats=p["peak_repeats"]),
        "bf16": matmul_peak_gflops(torch.bfloat16, sizes=p["peak_sizes"], repeats=p["peak_repeats"]),
    }
    out["matmul_peak_gflops"] = {k: round(v, 1) for k, v in peak.items()}
    out["matmul_peak_method"] = (
        f"best of {p['peak_repeats']} square matmuls of sides {list(p['peak_sizes'])} (_machine.matmul_peak_gflops)"
    )
    print(f"matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s", flush=True)
    # the paper ViT's GEMMs at batch 64 (64 x 50 tokens): qkv, MLP up, MLP down
    shapes = [(3200, 768, 2304), (3200, 768, 3072), (3200, 3072, 768)] if not p["quick"] else [(256, 64, 256)]
    gemm = []
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for m, k, n in shapes:
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            a @ b
            best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(p["peak_repeats"]))
            gemm.append({"precision": name, "m_k_n": [m, k, n], "gflops": round(2 * m * k * n / best / 1e9, 1)})
    out["model_gemm_gflops"] = gemm
    # int8: a dynamically quantised Linear (activations quantised per call), as quantize_dynamic makes it
    side = max(p["peak_sizes"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(torch.nn.Linear(side, side)), {torch.nn.Linear}, dtype=torch.qint8
        )
    x = torch.randn(side, side)
    with torch.no_grad():
        q(x)
        best = min(_timed(lambda: q(x)) for _ in range(p["peak_repeats"]))
    out["int8_dynamic_linear_gops"] = round(2 * side**3 / best / 1e9, 1)
    print(f"int8 dynamic-quantised Linear: {out['int8_dynamic_linear_gops']:.0f} GOP/s", flush=True)
    return peak


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
