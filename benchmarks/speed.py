"""Speed of training, patch encoding, retrieval and whole-slide prediction, each against the machine's limit.

    python benchmarks/speed.py [--quick] [--sections peak,train,inference,retrieval,slide] [--out PATH]

Sections (each records machine, commit, command, wall time and the load average before and after):

- peak: the measured fp32 and bf16 matmul peak (square matmuls, `_machine.matmul_peak_gflops`), the rate of the
  paper ViT's own GEMM shapes, and the rate of an int8 dynamically quantised Linear layer.
- train: a full cmrcnet training step (forward, backward, AdamW) per preset at batch 64 on random inputs, fp32
  and bf16: spots/s, analytic FLOPs per spot (`model_flops_per_spot`), achieved GFLOP/s and fraction of the
  precision's matmul peak, plus variants that look for the gaps (the trainer's input pipeline and EMA, 1 vs 2
  threads, contiguous vs channels-last input, the fused vs the math attention kernel, torch.compile in a fresh
  process with a cold inductor cache), interleaved step by step with the baseline on one model so that drifts
  of this shared VM cancel, each with its paired speed-up over the baseline.
- inference: `CMRCNet.embed_images` (eval, no grad) patches/s per preset, batch and precision, with encoder
  FLOPs per patch, plus interleaved variants (threads, memory format, attention kernel, bf16 weights instead of autocast, int8
  dynamic quantisation of the Linear layers, torch.compile, and `embed_patches` from uint8 as `predict` runs it).
- retrieval: top-50 cosine search of 1000 queries in banks of 1e4, 1e5 and 1e6 spots of dimension 256 drawn from
  a Gaussian mixture (clustered like real embeddings, not uniform): exact chunked torch search (`ExactIndex`)
  against `FaissIndex` (flat, IVF, HNSW) with nprobe / efSearch tuned on separate queries so that recall@50
  against exact search is >= 0.95, plus IVF trained on a sample (a knob `FaissIndex` lacks), and the cost of
  one slide batch's retrieval: the bank prepared once (`BankRetriever`, what predict-slide does) against
  preparing it for every batch (`predict_from_embeddings`). Without faiss (`pip install "cmrcnet[faiss]"`) only
  the exact rows are measured and the section says so.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # the working tree, installed or not
from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.flops import model_flops_per_spot
from cmrcnet.runtime import autocast_context

from _machine import git_commit, machine_info, matmul_peak_gflops

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
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
    compile_warmup=3,
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
INT8_PEAK: dict[str, float] = {}  # the int8 dynamic-quantised Linear rate measured by sec_peak
RECALL_TARGET = 0.95
TUNE_RECALL = 0.97  # tuned on separate queries with a margin, so the test recall stays >= RECALL_TARGET


# ---------------------------------------------------------------------------------------------- helpers
def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _autogroup() -> str | None:
    """This process's scheduler autogroup and its nice value (Linux), e.g. "/autogroup-36 nice 0"."""
    try:
        return Path("/proc/self/autogroup").read_text(encoding="ascii").strip()
    except OSError:
        return None


def _src_changes() -> list[str] | None:
    """Files under src/ that differ from the commit (the code measured is the working tree)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line[3:] for line in out.splitlines()]


def command_line() -> str:
    return "python " + shlex.join(["benchmarks/speed.py", *sys.argv[1:]])


@contextlib.contextmanager
def section(name: str, results: dict) -> Iterator[dict]:
    """Collect one section's results with its wall time and the load average around it."""
    out: dict[str, Any] = {
        "command": command_line(),
        "git_commit": git_commit(),
        "src_uncommitted_changes": _src_changes(),
        "machine": machine_info(),
        "load_average_before": loadavg(),
        "niceness": os.nice(0) if hasattr(os, "nice") else None,
        "autogroup": _autogroup(),
    }
    print(f"== {name} (load {out['load_average_before']})", flush=True)
    t0 = time.perf_counter()
    waited0 = WAIT["waited_s"]
    meter = CpuMeter()
    try:
        yield out
    finally:
        out["wall_seconds"] = round(time.perf_counter() - t0, 1)
        out["load_average_after"] = loadavg()
        out["others_cpu_cores_mean"] = round(meter.stop(), 2)
        out["waited_for_quiet_s"] = round(WAIT["waited_s"] - waited0, 1)
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
    """Which attention kernel F.scaled_dot_product_attention may use, entered INSIDE `autocast_context` so it
    overrides src's own choice: "src" (whatever src's compute context does), "fused" (torch's fused flash
    kernel for CPU, math as fallback) or "math" (the unfused reference kernel)."""
    if kind == "src":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kind == "fused":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    return sdpa_kernel([SDPBackend.MATH])


def src_sdpa_choice() -> dict:
    """Which SDPA backends src's `autocast_context` leaves enabled on the CPU, per precision."""
    out = {}
    for precision in ("fp32", "bf16"):
        with autocast_context(CPU, precision):
            flash = torch.backends.cuda.flash_sdp_enabled()
            math_ = torch.backends.cuda.math_sdp_enabled()
        out[precision] = (
            "fused flash kernel allowed (torch picks it)" if flash else ("math kernel only" if math_ else "?")
        )
    return out


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
            gemm.append(
                {"precision": name, "m_k_n": [m, k, n], "gflops": round(2 * m * k * n / best / 1e9, 1)}
            )
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
    INT8_PEAK["gops"] = out["int8_dynamic_linear_gops"]
    return peak


def _cpu_counters() -> tuple[float, float, float]:
    """(machine busy core-seconds, this process's CPU seconds incl. finished children, wall time)."""
    with open("/proc/stat", encoding="ascii") as fh:
        vals = [int(v) for v in fh.readline().split()[1:9]]
    busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system, time.perf_counter()


class CpuMeter:
    """Cores kept busy by OTHER processes while a measurement ran (machine busy time minus our own).

    On this 2-core machine anything above ~0.2 means the measurement shared the CPUs and is a lower bound.
    """

    def __init__(self) -> None:
        self.start = _cpu_counters()
        self.others = float("nan")

    def stop(self) -> float:
        end = _cpu_counters()
        wall = max(1e-9, end[2] - self.start[2])
        self.others = max(0.0, ((end[0] - self.start[0]) - (end[1] - self.start[1])) / wall)
        return self.others


def others_busy(window_s: float = 1.0) -> float:
    meter = CpuMeter()
    time.sleep(window_s)
    return meter.stop()


WAIT = {"max_s": 0.0, "threshold": 0.3, "waited_s": 0.0}  # set from --max-wait


def wait_quiet() -> float:
    """Wait (up to --max-wait seconds per call) until other processes use < 0.3 cores; return their load."""
    t0 = time.perf_counter()
    busy = others_busy(0.25)
    while busy >= WAIT["threshold"] and time.perf_counter() - t0 < WAIT["max_s"]:
        time.sleep(5)
        busy = others_busy(1.0)
    WAIT["waited_s"] += time.perf_counter() - t0
    return busy


def metered(fn: Callable[..., dict], *args: Any, **kwargs: Any) -> dict:
    """Run a measurement (after waiting for a quiet machine if asked) and attach the other processes' load."""
    before = wait_quiet()
    meter = CpuMeter()
    res = fn(*args, **kwargs)
    res["others_cpu_cores"] = round(meter.stop(), 2)
    res["others_cpu_cores_before"] = round(before, 2)
    return res


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- train
def measure_train(
    preset: str, precision: str, *, configs: dict[str, dict], batch: int, rounds: int, warmup: int, genes: int
) -> dict[str, dict]:
    """Time a cmrcnet training step (forward, backward, AdamW) under each config, interleaved.

    ONE model and optimiser; every round runs one step per config in turn, so slow drifts of the machine (a
    shared VM) hit all configs alike. The first `warmup` rounds are not timed. Config keys: threads (int),
    channels_last (bool, default True), sdpa ("src"/"fused"/"math", see sdpa_context), pipeline (index a uint8 patch table, random
    flips and rot90, normalise, as the trainer does, and update the EMA after the step), compile
    (torch.compile of the model). "baseline" must be one of the configs; each other config gets the median
    over rounds of (baseline step time / its step time) of the same round.
    """
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    s = cfg.img_size
    gen = torch.Generator().manual_seed(0)
    expr = torch.rand(batch, genes, generator=gen) * 3
    images = torch.randn(batch, 3, s, s, generator=gen)
    inputs = {True: images.contiguous(memory_format=torch.channels_last), False: images.contiguous()}
    pipeline = any(c.get("pipeline") for c in configs.values())
    if pipeline:
        from cmrcnet.training.spots import augment
        from cmrcnet.training.trainer import EMA

        table = torch.randint(0, 256, (2 * batch, s, s, 3), dtype=torch.uint8, generator=gen)
        ema = EMA(model, 0.99)
    compiled = torch.compile(model) if any(c.get("compile") for c in configs.values()) else None

    def step(c: dict) -> float:
        fmt = torch.channels_last if c.get("channels_last", True) else torch.contiguous_format
        with num_threads(c.get("threads")):
            t0 = time.perf_counter()
            x = inputs[c.get("channels_last", True)]
            if c.get("pipeline"):
                idx = torch.randperm(len(table), generator=gen)[:batch]
                x = augment(table[idx], gen, flips=True, rot90=True).contiguous(memory_format=fmt)
            opt.zero_grad(set_to_none=True)
            with autocast_context(CPU, precision), sdpa_context(c.get("sdpa", "src")):
                loss = (compiled if c.get("compile") else model)(x, expr)["loss"]
            loss.backward()
            opt.step()
            if c.get("pipeline"):
                ema.update(model)
                float(loss.detach())
            return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(warmup + rounds):
        for name, c in configs.items():
            times[name].append(step(c))
    base = times["baseline"][warmup:]
    out = {}
    for name, ts in times.items():
        t = median(ts[warmup:])
        res = {
            "step_seconds_median": round(t, 4),
            "step_seconds_all": [round(x, 3) for x in ts],
            "spots_per_s": round(batch / t, 2),
        }
        if name != "baseline":
            res["speedup_vs_baseline"] = round(
                median([b / x for b, x in zip(base, ts[warmup:], strict=True)]), 3
            )
        if configs[name].get("compile"):  # the warm-up rounds hold the compilation (forward and backward)
            res["compile_seconds"] = round(sum(ts[:warmup]) - warmup * t, 1)
        out[name] = res
    return out


def pipeline_overheads(preset: str, *, batch: int, genes: int, reps: int = 5) -> dict:
    """Time of the trainer's per-step work outside the model: batch augmentation and the EMA update."""
    from cmrcnet.training.spots import augment
    from cmrcnet.training.trainer import EMA

    cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(
        0, 256, (2 * batch, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8, generator=gen
    )
    model = build_model(cfg)
    ema = EMA(model, 0.99)

    def aug() -> None:
        idx = torch.randperm(len(table), generator=gen)[:batch]
        augment(table[idx], gen, flips=True, rot90=True).contiguous(memory_format=torch.channels_last)

    aug()
    ema.update(model)
    return {
        "augment_ms": round(1e3 * median([_timed(aug) for _ in range(reps)]), 1),
        "ema_update_ms": round(1e3 * median([_timed(lambda: ema.update(model)) for _ in range(reps)]), 1),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }


PROFILE_GROUPS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "quantized::")),
    ("attention (SDPA)", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("patch convolution", ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution")),
    ("dtype casts / copies", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")),
    ("dropout / masking RNG", ("aten::bernoulli", "aten::native_dropout", "aten::rand", "aten::uniform_")),
    (
        "optimizer (AdamW)",
        ("aten::_foreach", "aten::addcdiv_", "aten::addcmul_", "aten::lerp_", "aten::sqrt"),
    ),
)


def profile_step(fn: Callable[[], Any]) -> dict:
    """Self CPU time of one call of `fn` grouped by kind of op (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    groups = {name: 0.0 for name, _ in PROFILE_GROUPS}
    groups["other"] = 0.0
    for ev in prof.key_averages():
        name = ev.key
        for group, prefixes in PROFILE_GROUPS:
            if name.startswith(prefixes):
                groups[group] += ev.self_cpu_time_total / 1e6
                break
        else:
            if name.startswith("aten::"):
                groups["other"] += ev.self_cpu_time_total / 1e6
    total = sum(groups.values())
    return {
        "wall_seconds_profiled": round(wall, 3),
        "self_seconds": {k: round(v, 3) for k, v in groups.items()},
        "fraction": {k: round(v / total, 3) for k, v in groups.items()} if total else {},
    }


def profile_train(preset: str, precision: str, *, batch: int, genes: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size).contiguous(memory_format=torch.channels_last)
    e = torch.rand(batch, genes) * 3

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_context(CPU, precision):
            loss = model(x, e)["loss"]
        loss.backward()
        opt.step()

    out = profile_step(step)
    flops = model_flops_per_spot(cfg, training=True, batch_size=batch) * batch
    mm = out["self_seconds"]["matmul"]
    out["matmul_gflops_if_all_flops_in_matmuls"] = round(flops / mm / 1e9, 1) if mm else None
    return out


def profile_embed(preset: str, precision: str, *, batch: int, genes: int) -> dict:
    cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
    model = _embed_model(cfg, "autocast")
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with torch.no_grad(), autocast_context(CPU, precision):
            model.embed_images(x)

    return profile_step(run)


TRAIN_BF16_CONFIGS = {
    "baseline": {},
    "threads=1": {"threads": 1},
    "contiguous input": {"channels_last": False},
    "fused SDPA kernel": {"sdpa": "fused"},
    "math SDPA kernel": {"sdpa": "math"},
    "trainer pipeline (augment+EMA)": {"pipeline": True},
}
TRAIN_FP32_CONFIGS = {
    "baseline": {},
    "fused SDPA kernel": {"sdpa": "fused"},
    "math SDPA kernel": {"sdpa": "math"},
}


def sec_train(p: dict, peak: dict, out: dict) -> None:
    batch, genes = p["train_batch"], p["genes"]
    common = dict(batch=batch, rounds=p["train_steps"], genes=genes)
    out["setup"] = (
        f"cmrcnet method, batch {batch}, {genes} genes, random inputs. Per preset and precision ONE model is "
        f"trained with the configs interleaved step by step ({p['train_warmup']} untimed + {p['train_steps']} "
        "timed rounds; spots/s from the median step; speed-up = median over rounds of the baseline's step time / "
        "the config's, so drifts of this shared VM cancel). Baseline = autocast to the precision, channels-last "
        f"input, {torch.get_num_threads()} threads, the attention kernel src's autocast_context picks (the "
        "trainer minus its input pipeline). torch.compile runs in a fresh process with an empty inductor cache, interleaved with eager "
        "steps of the same model there"
    )
    out["matmul_peak_gflops"] = {k: round(v, 1) for k, v in peak.items()}
    out["src_attention_kernel"] = src_sdpa_choice()
    rows, presets = [], {}
    for preset in p["train_presets"]:
        cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
        flops = model_flops_per_spot(cfg, training=True, batch_size=batch)
        info: dict[str, Any] = {"train_gflop_per_spot": round(flops / 1e9, 3)}
        info["ceiling_spots_per_s"] = {k: round(v * 1e9 / flops, 1) for k, v in peak.items()}
        # cross-check of the analytic count (FlopCounterMode sees matmuls and the patch convolution only)
        small = 8
        model = build_model(cfg).train()
        x = torch.randn(small, 3, cfg.img_size, cfg.img_size)
        e = torch.rand(small, genes)
        counted = counted_flops(lambda m=model, x=x, e=e: m(x, e)["loss"].backward()) / small
        info["flop_check_batch8"] = {
            "analytic_gflop_per_spot": round(
                model_flops_per_spot(cfg, training=True, batch_size=small) / 1e9, 3
            ),
            "flopcounter_gflop_per_spot_no_attention": round(counted / 1e9, 3),
        }
        del model
        info["pipeline_overheads"] = pipeline_overheads(preset, batch=batch, genes=genes)
        info["profile_bf16_step"] = metered(profile_train, preset, "bf16", batch=batch, genes=genes)
        presets[preset] = info

        def add(variant: str, precision: str, res: dict, preset=preset, flops=flops) -> dict:
            row = {"preset": preset, "precision": precision, "variant": variant, "batch_size": batch, **res}
            if "spots_per_s" in res:
                gf = res["spots_per_s"] * flops / 1e9
                row["achieved_gflops"] = round(gf, 1)
                row["fraction_of_peak"] = round(gf / peak[precision], 3)
            rows.append(row)
            sp, up = res.get("spots_per_s"), res.get("speedup_vs_baseline")
            msg = f"{sp:7.1f} spots/s" if sp is not None else f"ERROR {res.get('error')}"
            print(
                f"  train {preset:5s} {precision} {variant:36s} {msg}" + (f"  x{up}" if up else ""),
                flush=True,
            )
            return row

        def add_group(precision: str, group: dict) -> None:
            shared = {k: group.pop(k) for k in ("others_cpu_cores", "others_cpu_cores_before") if k in group}
            if "error" in group:
                add("(group failed)", precision, {"error": group["error"], **shared})
                return
            for name, res in group.items():
                add(name, precision, {**res, **shared})

        warm = p["train_warmup"]
        add_group(
            "fp32", metered(measure_train, preset, "fp32", configs=TRAIN_FP32_CONFIGS, warmup=warm, **common)
        )
        add_group(
            "bf16", metered(measure_train, preset, "bf16", configs=TRAIN_BF16_CONFIGS, warmup=warm, **common)
        )
        if p["compile"]:
            spec = {"kind": "train", "preset": preset, "precision": "bf16", **common}
            spec["warmup"] = p["compile_warmup"]
            res = metered(run_worker, spec, p["compile_timeout_s"])
            if "error" in res:
                add("torch.compile", "bf16", res)
            else:
                eager = res["baseline"]
                res = {**res["torch.compile"], "others_cpu_cores": res["others_cpu_cores"]}
                res["note"] = f"own process; eager baseline there {eager['spots_per_s']} spots/s"
                add("torch.compile", "bf16", res)
        else:
            rows.append(
                {"preset": preset, "precision": "bf16", "variant": "torch.compile", "batch_size": batch}
                | {"skipped": "--quick"}
            )
        mine = [r for r in rows if r["preset"] == preset and r["precision"] == "bf16"]
        base = next(r for r in mine if r["variant"] == "baseline")
        best = max(
            (r for r in mine if "speedup_vs_baseline" in r and "pipeline" not in r["variant"]),
            key=lambda r: r["speedup_vs_baseline"],
            default=None,
        )
        if best is None or best["speedup_vs_baseline"] <= 1.0:
            best = {"variant": "baseline (no variant was faster)", "speedup_vs_baseline": 1.0}
        info["before_after_bf16"] = {
            "before": {"variant": "baseline", "spots_per_s": base["spots_per_s"]},
            "after": {
                "variant": best["variant"],
                "spots_per_s": round(base["spots_per_s"] * best["speedup_vs_baseline"], 2),
            },
            "speedup": best["speedup_vs_baseline"],
            "how": "after = baseline spots/s x the best paired speed-up",
        }
    out["presets"] = presets
    out["results"] = rows


# ---------------------------------------------------------------------------------------------- inference
def _embed_model(cfg: ModelConfig, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)
    elif mode == "int8_dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def _agreement(y: torch.Tensor, ref: torch.Tensor) -> dict:
    """How close embeddings are to the fp32 ones: cosine per patch, and the error relative to the spread."""
    y, ref = y.float(), ref.float()
    cos = F.cosine_similarity(y, ref, dim=1)
    spread = (ref - ref.mean(0, keepdim=True)).norm()
    return {
        "cosine_to_fp32_min": round(float(cos.min()), 5),
        "error_over_spread": round(float((y - ref).norm() / spread), 4),
    }


def measure_embed(
    preset: str, *, configs: dict[str, dict], batch: int, rounds: int, warmup: int, genes: int
) -> dict:
    """Patches/s of `embed_images` in eval mode under each config, interleaved batch by batch (as in
    `measure_train`). Config keys: precision ("fp32"/"bf16"), ref (the config its speed-up is relative to),
    threads, channels_last, sdpa, grad ("no_grad"/"inference_mode"), compile, and mode: "autocast" (as
    `embed_patches`: fp32 weights, autocast to the precision), "bf16_weights" (weights and input in bf16, no
    autocast), "int8_dynamic" (Linear layers int8 with activations quantised per call, fp32 elsewhere) or
    "embed_patches" (`cmrcnet.inference.predict.embed_patches` from uint8 patches, augment/normalise included).
    The last timed output of each config is compared with the fp32 embeddings of the same patches.
    """
    cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
    models: dict[str, torch.nn.Module] = {}
    for c in configs.values():
        mode = c.get("mode", "autocast")
        key = "autocast" if mode == "embed_patches" else mode
        if key not in models:
            models[key] = _embed_model(cfg, key)
    fp32_model = models.get("autocast") or _embed_model(cfg, "autocast")
    gen = torch.Generator().manual_seed(1)
    uint8 = torch.randint(0, 256, (batch, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8, generator=gen)
    from cmrcnet.training.spots import augment

    x = augment(uint8, torch.Generator(), flips=False, rot90=False)  # the normalised float input
    with torch.no_grad():
        reference = fp32_model.embed_images(x.contiguous())
    inputs = {
        (True, False): x.contiguous(memory_format=torch.channels_last),
        (False, False): x.contiguous(),
        (True, True): x.contiguous(memory_format=torch.channels_last).to(torch.bfloat16),
        (False, True): x.contiguous().to(torch.bfloat16),
    }
    compiled = {}
    for name, c in configs.items():
        if c.get("compile"):
            compiled[name] = torch.compile(models[c.get("mode", "autocast")].embed_images)

    def run(name: str, c: dict) -> tuple[float, torch.Tensor]:
        mode = c.get("mode", "autocast")
        grad_ctx = torch.inference_mode if c.get("grad") == "inference_mode" else torch.no_grad
        with num_threads(c.get("threads")), grad_ctx():
            t0 = time.perf_counter()
            if mode == "embed_patches":
                from cmrcnet.inference.predict import embed_patches

                trained = SimpleNamespace(model=models["autocast"], model_config=cfg)
                y = embed_patches(trained, uint8, batch_size=batch, precision=c["precision"])
            else:
                xin = inputs[(c.get("channels_last", True), mode == "bf16_weights")]
                fn = compiled.get(name) or models[mode].embed_images
                prec = c["precision"] if mode == "autocast" else "fp32"
                with autocast_context(CPU, prec), sdpa_context(c.get("sdpa", "src")):
                    y = fn(xin)
                y = y.float()
            return time.perf_counter() - t0, y

    times: dict[str, list[float]] = {name: [] for name in configs}
    last: dict[str, torch.Tensor] = {}
    for _ in range(warmup + rounds):
        for name, c in configs.items():
            t, last[name] = run(name, c)
            times[name].append(t)
    out = {}
    for name, ts in times.items():
        t = median(ts[warmup:])
        res = {"seconds_per_batch": round(t, 4), "patches_per_s": round(batch / t, 2)}
        ref = configs[name].get("ref")
        if ref:
            pairs = zip(times[ref][warmup:], ts[warmup:], strict=True)
            res["speedup_vs_baseline"] = round(median([b / x for b, x in pairs]), 3)
            res["relative_to"] = ref
        if configs[name].get("compile"):
            res["compile_seconds"] = round(sum(ts[:warmup]) - warmup * t, 1)
        res.update(_agreement(last[name], reference))
        out[name] = res
    return out


EMBED_CONFIGS = {
    "baseline fp32": {"precision": "fp32"},
    "baseline bf16": {"precision": "bf16"},
    "threads=1": {"precision": "bf16", "threads": 1, "ref": "baseline bf16"},
    "contiguous input": {"precision": "bf16", "channels_last": False, "ref": "baseline bf16"},
    "fused SDPA kernel": {"precision": "bf16", "sdpa": "fused", "ref": "baseline bf16"},
    "math SDPA kernel": {"precision": "bf16", "sdpa": "math", "ref": "baseline bf16"},
    "inference_mode": {"precision": "bf16", "grad": "inference_mode", "ref": "baseline bf16"},
    "bf16 weights (no autocast)": {"precision": "bf16", "mode": "bf16_weights", "ref": "baseline bf16"},
    "int8 dynamic quant (Linear)": {"precision": "fp32", "mode": "int8_dynamic", "ref": "baseline bf16"},
    "embed_patches from uint8": {"precision": "bf16", "mode": "embed_patches", "ref": "baseline bf16"},
    "fused SDPA kernel (fp32)": {"precision": "fp32", "sdpa": "fused", "ref": "baseline fp32"},
    "math SDPA kernel (fp32)": {"precision": "fp32", "sdpa": "math", "ref": "baseline fp32"},
}


def sec_inference(p: dict, peak: dict, out: dict) -> None:
    genes, rounds = p["genes"], p["infer_steps"]
    out["setup"] = (
        "CMRCNet.embed_images in eval mode under torch.no_grad on normalised random uint8 patches, the configs "
        f"interleaved batch by batch on the same models (1 untimed + {rounds} timed rounds; patches/s from the "
        "median batch; speed-up = median over rounds of the reference config's batch time / this config's). "
        "Baseline = src's autocast_context for the precision, channels-last input, torch's default thread count "
        "(what embed_patches does). Agreement: cosine to the fp32 embeddings of the same patches and "
        "||y - y_fp32|| / ||y_fp32 - mean|| (randomly initialised weights, so only a rough guide for trained ones)"
    )
    out["matmul_peak_gflops"] = {k: round(v, 1) for k, v in peak.items()}
    out["src_attention_kernel"] = src_sdpa_choice()
    rows, presets = [], {}
    for preset in p["infer_presets"]:
        cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
        flops = embed_flops_per_patch(cfg)
        model = build_model(cfg).eval()
        x2 = torch.randn(2, 3, cfg.img_size, cfg.img_size)
        with torch.no_grad():
            counted = counted_flops(lambda m=model, x=x2: m.embed_images(x)) / 2
        del model
        presets[preset] = {
            "embed_gflop_per_patch": round(flops / 1e9, 4),
            "flopcounter_gflop_per_patch_no_attention": round(counted / 1e9, 4),
            "model_flops_per_spot_training_false_gflop": round(
                model_flops_per_spot(cfg, training=False, batch_size=64) / 1e9, 4
            ),
            "ceiling_patches_per_s": {k: round(v * 1e9 / flops, 1) for k, v in peak.items()},
            "profile_bf16_batch": metered(
                profile_embed, preset, "bf16", batch=p["infer_batches"][0], genes=genes
            ),
        }

        def add(variant: str, precision: str, batch: int, res: dict, preset=preset, flops=flops) -> dict:
            row = {"preset": preset, "precision": precision, "variant": variant, "batch_size": batch, **res}
            if "patches_per_s" in res:
                gf = res["patches_per_s"] * flops / 1e9
                row["achieved_gflops"] = round(gf, 1)
                row["fraction_of_peak"] = round(gf / peak[precision], 3)
            if variant.startswith("int8") and INT8_PEAK.get("gops") and "achieved_gflops" in row:
                row["fraction_of_peak"] = round(row["achieved_gflops"] / INT8_PEAK["gops"], 3)
                row["note"] = f"fraction of the int8 Linear rate {INT8_PEAK['gops']} GOP/s"
            rows.append(row)
            pp, up = res.get("patches_per_s"), res.get("speedup_vs_baseline")
            msg = f"{pp:8.1f} patches/s" if pp is not None else f"ERROR {res.get('error')}"
            print(f"  embed {preset:5s} {precision} b{batch:<4d} {variant:30s} {msg}" + (f"  x{up}" if up else ""), flush=True)  # fmt: skip
            return row

        def add_group(batch: int, configs: dict, group: dict) -> None:
            shared = {k: group.pop(k) for k in ("others_cpu_cores", "others_cpu_cores_before") if k in group}
            if "error" in group:
                add("(group failed)", "bf16", batch, {"error": group["error"], **shared})
                return
            for name, res in group.items():
                prec = configs[name]["precision"] if name in configs else "bf16"
                variant = "baseline" if name.startswith("baseline") else name
                add(
                    variant.replace(" (fp32)", ""),
                    "bf16" if name.startswith("int8") else prec,
                    batch,
                    {**res, **shared},
                )

        b = p["infer_batches"][0]  # the slide default (64)
        kw = dict(rounds=rounds, warmup=1, genes=genes)
        add_group(b, EMBED_CONFIGS, metered(measure_embed, preset, configs=EMBED_CONFIGS, batch=b, **kw))
        two = {k: EMBED_CONFIGS[k] for k in ("baseline fp32", "baseline bf16")}
        for batch in p["infer_batches"][1:]:
            add_group(batch, two, metered(measure_embed, preset, configs=two, batch=batch, **kw))
        if p["compile"]:
            spec = {"kind": "embed", "preset": preset, "batch": b, "rounds": rounds, "genes": genes}
            spec["warmup"] = p["compile_warmup"]
            res = metered(run_worker, spec, p["compile_timeout_s"])
            if "error" in res:
                add("torch.compile", "bf16", b, res)
            else:
                eager = res["baseline bf16"]
                res = {**res["torch.compile"], "others_cpu_cores": res["others_cpu_cores"]}
                res["note"] = f"own process; eager baseline there {eager['patches_per_s']} patches/s"
                add("torch.compile", "bf16", b, res)
        else:
            rows.append(
                {"preset": preset, "precision": "bf16", "variant": "torch.compile", "batch_size": b}
                | {"skipped": "--quick"}
            )
        mine = [
            r for r in rows if r["preset"] == preset and r["batch_size"] == b and r["precision"] == "bf16"
        ]
        base = next(r for r in mine if r["variant"] == "baseline")
        cands = [
            r for r in mine if r.get("relative_to") == "baseline bf16" or r["variant"] == "torch.compile"
        ]
        cands = [
            r for r in cands if "speedup_vs_baseline" in r and not r["variant"].startswith("embed_patches")
        ]
        none = {"variant": "baseline (no variant was faster)", "speedup_vs_baseline": 1.0}
        best = max(
            [r for r in cands if not r["variant"].startswith("int8")] + [none],
            key=lambda r: r["speedup_vs_baseline"],
        )
        best_any = max([*cands, none], key=lambda r: r["speedup_vs_baseline"])
        presets[preset]["before_after_bf16"] = {
            "before": {"variant": "baseline", "patches_per_s": base["patches_per_s"]},
            "after_same_numerics": {
                "variant": best["variant"],
                "patches_per_s": round(base["patches_per_s"] * best["speedup_vs_baseline"], 2),
            },
            "after_any": {
                "variant": best_any["variant"],
                "patches_per_s": round(base["patches_per_s"] * best_any["speedup_vs_baseline"], 2),
            },
            "how": "after = baseline patches/s x the best paired speed-up",
        }  # fmt: skip
    out["presets"] = presets
    out["results"] = rows


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
        per_call = median([_timed(call) for _ in range(3)])
        t0 = time.perf_counter()
        retriever = BankRetriever(bank, k=K, exclude_sample="slide")
        build = time.perf_counter() - t0

        def direct(retriever=retriever) -> None:
            retriever.predict(q)

        direct()
        per_direct = median([_timed(direct) for _ in range(3)])
        rows.append({
            "bank_size": n, "genes": genes, "batch": batch,
            "predict_from_embeddings_ms": round(1e3 * per_call, 1),
            "bank_retriever_build_ms": round(1e3 * build, 1),
            "bank_retriever_predict_ms": round(1e3 * per_direct, 1),
            "tiles_per_s_ceiling_from_retrieval": round(batch / per_direct, 1),
        })  # fmt: skip
        print(f"    slide batch retrieval, bank {n}: {rows[-1]}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- slide
def train_preset_run(root: Path, preset: str, patch_px: int) -> tuple[Path, float]:
    """A 1-epoch run of `preset` on a small synthetic dataset (weights barely trained: speed only)."""
    from cmrcnet.data.prepare import prepare_sample
    from cmrcnet.data.synthetic import SyntheticConfig, make_synthetic_samples
    from cmrcnet.run.config import load_run_config
    from cmrcnet.workflows.train import train_run

    ds = root / f"ds_{patch_px}"
    if not ds.exists():
        samples = make_synthetic_samples(
            SyntheticConfig(n_slides=2, n_patients=1, n_rows=6, n_cols=6, n_genes=30)
        )
        for s in samples:
            prepare_sample(s, ds, patch_px=patch_px, progress=False)
    cfg = load_run_config(preset)
    cfg.train.epochs = 1
    cfg.train.batch_size = 8
    t0 = time.perf_counter()
    train_run(
        data_dir=ds,
        train_samples=["synS1", "synS2"],
        out_dir=root / f"run_{preset}",
        config=cfg,
        progress=False,
    )
    return root / f"run_{preset}", time.perf_counter() - t0


def sec_slide(p: dict, out: dict, workdir: Path | None) -> None:
    from slide_memory import run_child, write_slide

    pixel = 0.5
    out["setup"] = (
        f"synthetic pyramidal tiled TIFFs (zlib, 256 px tiles, levels down to ~512 px) of sides "
        f"{list(p['slide_sides'])} px at {pixel} um/px with the same tissue fraction (slide_memory.write_slide); "
        f"1-epoch runs per preset trained on a 72-spot synthetic dataset prepared at {p['slide_patch_px']} px "
        "(so the bank holds 72 spots and retrieval is negligible; see retrieval.slide_batch_retrieval for large "
        "banks); `cmrcnet predict-slide --batch-size 64` (default precision, auto) in a child process whose peak RSS is its "
        "rusage (slide_memory.run_child); tiles/s is predict-slide's own figure (reading + encoding + "
        "retrieval, excluding model load and output writing)"
    )
    python = sys.executable
    env_path = os.pathsep.join(x for x in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if x)
    os.environ["PYTHONPATH"] = env_path  # children import the working tree too
    rows, baselines, training = [], {}, {}
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="speed_slide_") as tmp:
        root = Path(tmp)
        slides = {}
        for side in p["slide_sides"]:
            path = root / f"slide_{side}.tif"
            t0 = time.perf_counter()
            write_slide(path, side, pixel_size_um=pixel, pyramid=True)
            slides[side] = path
            print(f"  wrote {side} px slide in {time.perf_counter() - t0:.1f} s", flush=True)
        for preset in p["slide_presets"]:
            run, seconds = train_preset_run(root, preset, p["slide_patch_px"])
            training[preset] = round(seconds, 1)
            rc, base_rss, base_s = run_child([
                python, "-c",
                "import sys; from cmrcnet.inference import slide; from cmrcnet.run.load import "
                "load_trained_model; from cmrcnet.inference.bank import load_bank; "
                "t = load_trained_model(sys.argv[1]); load_bank(sys.argv[1], t)",
                str(run),
            ])  # fmt: skip
            baselines[preset] = {"peak_rss_mb": round(base_rss, 1), "seconds": round(base_s, 2), "exit": rc}
            for side, slide in slides.items():
                dest = root / f"out_{preset}_{side}"
                cmd = [python, "-m", "cmrcnet", "predict-slide", "--model", str(run), "--slide", str(slide),
                       "--out", str(dest), "--quiet", "--batch-size", "64"]  # fmt: skip
                before = wait_quiet()
                meter = CpuMeter()
                rc, rss, seconds = run_child(cmd)
                others = round(meter.stop(), 2)
                row = {
                    "preset": preset,
                    "side_px": side,
                    "megapixels": round(side * side / 1e6, 1),
                    "exit": rc,
                }
                if rc == 0:
                    summary = json.loads((dest / "summary.json").read_text())
                    row.update({
                        "n_tissue_tiles": summary["n_tissue_tiles"],
                        "tiles_per_second": summary["tiles_per_second"],
                        "seconds_predict": summary["seconds_predict"],
                        "child_wall_seconds": round(seconds, 2),
                        "peak_rss_mb": round(rss, 1),
                        "peak_rss_above_load_only_mb": round(rss - base_rss, 1),
                        "level": summary["level"],
                        "others_cpu_cores": others,
                        "others_cpu_cores_before": round(before, 2),
                    })  # fmt: skip
                rows.append(row)
                print(f"  slide {preset} {side}: {row}", flush=True)
    out["training_seconds"] = training
    out["load_only_baseline"] = baselines
    out["results"] = rows
    out["large_vs_small"] = {}
    for preset in p["slide_presets"]:
        pr = [r for r in rows if r["preset"] == preset and r["exit"] == 0]
        if len(pr) == 2:
            small, large = sorted(pr, key=lambda r: r["side_px"])
            out["large_vs_small"][preset] = {
                "area_ratio": round((large["side_px"] / small["side_px"]) ** 2, 2),
                "tile_ratio": round(large["n_tissue_tiles"] / small["n_tissue_tiles"], 2),
                "peak_rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                "peak_rss_increase_mb": round(large["peak_rss_mb"] - small["peak_rss_mb"], 1),
            }


# ---------------------------------------------------------------------------------------------- targets
def _auto_precision(sections: dict) -> str:
    """The precision `--precision auto` picks on the machine these sections ran on (cmrcnet.runtime)."""
    machine = next((s["machine"] for s in sections.values() if "machine" in s), {})
    return machine.get("precision_auto", "bf16")


def _baseline(rows: list[dict], preset: str, precision: str, unit: str, **match: Any) -> float | None:
    for r in rows:
        if (r["preset"], r["precision"], r["variant"]) == (preset, precision, "baseline") and unit in r:
            if all(r.get(k) == v for k, v in match.items()):
                return float(r[unit])
    return None


def targets(sections: dict, quick: bool) -> list[dict]:
    """The issues' targets against what was measured, each against the limit of the precision actually used
    (the one `--precision auto` picks here); n/a when not measured."""
    rows: list[dict] = []
    if quick:
        return rows
    auto = _auto_precision(sections)
    train = sections.get("train", {})
    trows = train.get("results", [])
    for preset, tp in train.get("presets", {}).items():
        fp32 = _baseline(trows, preset, "fp32", "spots_per_s")
        used = _baseline(trows, preset, auto, "spots_per_s")
        if fp32 and used:
            ratio = used / fp32
            rows.append({
                "target": f"{preset}-preset training at the default precision (auto -> {auto}) within 0.8-1.25x of "
                          "fp32 without native bf16, no slower than fp32 with it",
                "measured": f"{used} spots/s {auto} vs {fp32} fp32 (x{ratio:.2f})",
                "limit": f"{tp['ceiling_spots_per_s'][auto]} spots/s {auto} FLOP ceiling",
                "met": ratio >= 1.0 if auto == "bf16" else 0.8 <= ratio <= 1.25,
            })  # fmt: skip
    tp = train.get("presets", {}).get("paper")
    fp32 = _baseline(trows, "paper", "fp32", "spots_per_s")
    if tp and fp32:
        ceiling = tp["ceiling_spots_per_s"]["fp32"]
        rows.append({
            "target": "paper-preset fp32 training >= 90% of the fp32 FLOP ceiling",
            "measured": f"{fp32} spots/s = {100 * fp32 / ceiling:.0f}%",
            "limit": f"{ceiling} spots/s = fp32 matmul peak {train['matmul_peak_gflops']['fp32']} GFLOP/s / "
                     f"{tp['train_gflop_per_spot']} GFLOP per spot",
            "met": fp32 >= 0.9 * ceiling,
        })  # fmt: skip
    inf = sections.get("inference", {}).get("presets", {})
    slide = sections.get("slide", {})
    for r in slide.get("results", []):
        info = inf.get(r["preset"])
        if r.get("exit") != 0 or not info:
            continue
        ceiling = info["ceiling_patches_per_s"][auto]
        embed = _baseline(sections["inference"].get("results", []), r["preset"], auto, "patches_per_s",
                          batch_size=64)  # fmt: skip
        rows.append({
            "target": f"{r['preset']}-preset whole-slide prediction >= 70% of the encoder's {auto} FLOP ceiling "
                      f"({r['side_px']} px slide, {r['n_tissue_tiles']} tiles)",
            "measured": f"{r['tiles_per_second']} tiles/s = {100 * r['tiles_per_second'] / ceiling:.0f}%"
                        + (f" (embed_images alone: {embed} patches/s = {100 * embed / ceiling:.0f}%)" if embed else ""),
            "limit": f"{ceiling} tiles/s = {auto} matmul peak / {info['embed_gflop_per_patch']} GFLOP per tile",
            "met": r["tiles_per_second"] >= 0.7 * ceiling,
        })  # fmt: skip
    lv = slide.get("large_vs_small", {}).get("paper")
    if lv:
        rows.append({
            "target": "slide peak RSS independent of slide size (paper preset)",
            "measured": f"peak RSS x{lv['peak_rss_ratio']} ({lv['peak_rss_increase_mb']:+} MB) for x{lv['area_ratio']} area, x{lv['tile_ratio']} tiles",
            "met": lv["peak_rss_ratio"] <= 1.05,
            "note": "; ".join(f"{k} preset: x{v['peak_rss_ratio']} ({v['peak_rss_increase_mb']:+} MB)"
                              for k, v in slide["large_vs_small"].items() if k != "paper"),
        })  # fmt: skip
    best = sections.get("retrieval", {}).get("best_approximate", {}).get("1000000")
    if best:
        rows.append({
            "target": "FAISS >= 10x exact search at recall@50 >= 0.95, 1e6 spots",
            "measured": f"{best['speedup_vs_exact_torch']}x ({best['queries_per_s']} q/s, recall {best['recall_at_50']}, {best['method']} {best['options']})",
            "met": best["speedup_vs_exact_torch"] >= 10 and best["recall_at_50"] >= RECALL_TARGET,
        })  # fmt: skip
    return rows


def _profile_text(prof: dict | None) -> str:
    if not prof or "fraction" not in prof:
        return ""
    parts = [f"{k} {100 * v:.0f}%" for k, v in prof["fraction"].items() if v >= 0.005]
    return "; profile of one bf16 call (self time): " + ", ".join(parts)


def findings(sections: dict) -> list[str]:
    """Plain statements derived from the numbers: which variants paid, where the time goes."""
    notes = []
    for sec_name, unit in (("train", "spots_per_s"), ("inference", "patches_per_s")):
        sec = sections.get(sec_name, {})
        rows = sec.get("results", [])
        for preset in sec.get("presets", {}):
            ups, downs = [], []
            for r in rows:
                if (
                    r["preset"] != preset
                    or "speedup_vs_baseline" not in r
                    or r["variant"].startswith("baseline")
                ):
                    continue
                txt = f"{r['variant']} ({r['precision']}) x{r['speedup_vs_baseline']}"
                if "compile_seconds" in r:
                    txt += f" after {r['compile_seconds']} s of compilation"
                (ups if r["speedup_vs_baseline"] >= 1.03 else downs).append(txt)
            errors = [f"{r['variant']}: {r['error']}" for r in rows if r["preset"] == preset and "error" in r]
            ba = sec["presets"][preset].get("before_after_bf16", {})
            after = ba.get("after") or ba.get("after_any") or {}
            notes.append(
                f"{sec_name}, {preset}: paid: {', '.join(ups) or 'none'}; did not pay (< x1.03): "
                f"{', '.join(downs) or 'none'}" + (f"; errors: {'; '.join(errors)}" if errors else "")
                + f". bf16 before {ba.get('before', {}).get(unit)} -> after {after.get(unit)} ({after.get('variant')})."
            )  # fmt: skip
    ret = sections.get("retrieval", {})
    for n, best in ret.get("best_approximate", {}).items():
        notes.append(
            f"retrieval, bank {n}: fastest index with test recall@50 >= {RECALL_TARGET}: {best['method']} "
            f"{best['options']}, {best['queries_per_s']} q/s = x{best['speedup_vs_exact_torch']} exact torch, "
            f"recall {best['recall_at_50']}, build {best['build_seconds']} s."
        )
    slide = sections.get("slide", {})
    inf = sections.get("inference", {})
    for r in slide.get("results", []):
        base = [x for x in inf.get("results", []) if x["preset"] == r["preset"] and x["variant"] == "baseline"
                and x["precision"] == "bf16" and x["batch_size"] == 64 and "patches_per_s" in x]  # fmt: skip
        if base and r.get("tiles_per_second"):
            notes.append(
                f"slide, {r['preset']} {r['side_px']} px: {r['tiles_per_second']} tiles/s = "
                f"{100 * r['tiles_per_second'] / base[0]['patches_per_s']:.0f}% of embed_images alone "
                f"({base[0]['patches_per_s']} patches/s bf16, batch 64); the rest is reading, resizing, "
                "retrieval and the reader thread competing for the 2 cores."
            )
    return notes


# ---------------------------------------------------------------------------------------------- report
def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "yes" if v else "**no**"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(x: float | None) -> str | None:
    return None if x is None else f"{100 * x:.0f}%"


def _meta(s: dict) -> str:
    return (
        f"_`{s.get('command')}` at {s.get('git_commit')}; {s.get('wall_seconds')} s; load average "
        f"{s.get('load_average_before')} before, {s.get('load_average_after')} after; other processes used "
        f"{s.get('others_cpu_cores_mean')} cores on average during the section (waited {s.get('waited_for_quiet_s')} s "
        f"for a quiet machine; this process: nice {s.get('niceness')}, {s.get('autogroup')})._"
    )


def _probe_text(machine: dict) -> str:
    pr = machine.get("precision_probe") or {}
    if not pr:
        return "not recorded"
    return f"fp32 {pr['fp32_gflops']} GFLOP/s, bf16 {pr['bf16_gflops']} GFLOP/s (bf16 x{pr['bf16_speedup']})"


def write_markdown(path: Path, report: dict) -> None:
    sec = report["sections"]
    machine = next((s["machine"] for s in sec.values() if "machine" in s), {})
    md = [
        "# Speed: training, encoding, retrieval and whole-slide prediction against the machine's limit",
        "",
        f"Written by `{report['command']}` (commit {report['git_commit']}). Machine: {machine.get('cpu')}, "
        f"{machine.get('cores')} cores, torch {machine.get('torch')} ({machine.get('torch_threads')} threads).",
        "",
        f"**CPU: {machine.get('cpu_line')}.** Precision probe (256^3 GEMM, cmrcnet.runtime): "
        f"{_probe_text(machine)}; `--precision auto` runs **{machine.get('precision_auto')}** here, and every "
        "target below is stated against that precision's measured limit. "
        "Each section lists its own command, commit, wall time and load average (2 cores: a load above ~2 "
        "means another job shared the CPUs and the figures are lower bounds).",
        "",
        "## Targets",
        "",
    ]
    tg = report.get("targets") or []
    if tg:
        md.append(_table(["target", "measured", "limit on this machine", "met", "note"],
                         [[t["target"], t["measured"], t.get("limit"), t["met"], t.get("note")] for t in tg]))  # fmt: skip
    else:
        md.append("_No target applies to this run (quick mode or sections not run)._")
    if "peak" in sec:
        s = sec["peak"]
        md += ["", "## Peak", "", _meta(s), ""]
        if "error" in s:
            md.append(f"ERROR: {s['error']}")
        else:
            pk = s["matmul_peak_gflops"]
            md.append(f"Matmul peak ({s['matmul_peak_method']}): **fp32 {pk['fp32']} GFLOP/s, bf16 {pk['bf16']} GFLOP/s**; "
                      f"int8 dynamically quantised Linear: {s['int8_dynamic_linear_gops']} GOP/s.")  # fmt: skip
            md += ["", "The model's own GEMM shapes (batch 64 x 50 tokens):", ""]
            md.append(_table(["precision", "m, k, n", "GFLOP/s"], [[g["precision"], g["m_k_n"], g["gflops"]] for g in s["model_gemm_gflops"]]))  # fmt: skip
    if "train" in sec:
        s = sec["train"]
        md += ["", "## Training (spots/s)", "", _meta(s), ""]
        if "error" in s:
            md.append(f"ERROR: {s['error']}")
        else:
            md += [
                s["setup"] + ".",
                "",
                f"Attention kernel inside src's autocast_context: {s.get('src_attention_kernel')}.",
                "",
            ]
            for name, info in s["presets"].items():
                po = info["pipeline_overheads"]
                fc = info["flop_check_batch8"]
                md.append(
                    f"- **{name}**: {info['train_gflop_per_spot']} GFLOP per spot (analytic; FlopCounterMode without "
                    f"attention: {fc['flopcounter_gflop_per_spot_no_attention']} vs analytic {fc['analytic_gflop_per_spot']} at batch 8); "
                    f"ceiling {info['ceiling_spots_per_s']['fp32']} spots/s fp32, {info['ceiling_spots_per_s']['bf16']} bf16. "
                    f"Trainer overheads per step: augment {po['augment_ms']} ms, EMA update {po['ema_update_ms']} ms "
                    f"({po['n_parameters'] / 1e6:.1f} M parameters). bf16 before/after: {info['before_after_bf16']['before']['spots_per_s']} -> "
                    f"{info['before_after_bf16']['after']['spots_per_s']} ({info['before_after_bf16']['after']['variant']})"
                    f"{_profile_text(info.get('profile_bf16_step'))}."
                )  # fmt: skip
            md.append("")
            md.append(_table(
                ["preset", "precision", "variant", "spots/s", "GFLOP/s", "of peak", "vs baseline", "others' cores", "note"],
                [[r["preset"], r["precision"], r["variant"], r.get("spots_per_s"), r.get("achieved_gflops"),
                  _pct(r.get("fraction_of_peak")), r.get("speedup_vs_baseline"), r.get("others_cpu_cores"),
                  r.get("error") or r.get("skipped") or "; ".join(x for x in ((f"compile {r['compile_seconds']} s" if "compile_seconds" in r else ""), r.get("note", "")) if x) or None]
                 for r in s["results"]],
            ))  # fmt: skip
    if "inference" in sec:
        s = sec["inference"]
        md += ["", "## Inference: patch encoding (patches/s)", "", _meta(s), ""]
        if "error" in s:
            md.append(f"ERROR: {s['error']}")
        else:
            md += [
                s["setup"] + ".",
                "",
                f"Attention kernel inside src's autocast_context: {s.get('src_attention_kernel')}.",
                "",
            ]
            for name, info in s["presets"].items():
                ba = info["before_after_bf16"]
                md.append(
                    f"- **{name}**: {info['embed_gflop_per_patch']} GFLOP per patch (encoder + image head; "
                    f"`model_flops_per_spot(training=False)` = {info['model_flops_per_spot_training_false_gflop']} counts the whole loss forward); "
                    f"ceiling {info['ceiling_patches_per_s']['fp32']} patches/s fp32, {info['ceiling_patches_per_s']['bf16']} bf16. "
                    f"bf16 before/after: {ba['before']['patches_per_s']} -> {ba['after_same_numerics']['patches_per_s']} "
                    f"({ba['after_same_numerics']['variant']}); any numerics: {ba['after_any']['patches_per_s']} ({ba['after_any']['variant']})"
                    f"{_profile_text(info.get('profile_bf16_batch'))}."
                )  # fmt: skip
            md.append("")
            md.append(_table(
                ["preset", "precision", "batch", "variant", "patches/s", "GFLOP/s", "of peak", "vs baseline", "min cos to fp32", "err / spread", "others' cores", "note"],
                [[r["preset"], r["precision"], r["batch_size"], r["variant"], r.get("patches_per_s"), r.get("achieved_gflops"),
                  _pct(r.get("fraction_of_peak")), r.get("speedup_vs_baseline"), r.get("cosine_to_fp32_min"), r.get("error_over_spread"),
                  r.get("others_cpu_cores"), r.get("error") or r.get("skipped") or "; ".join(x for x in ((f"compile {r['compile_seconds']} s" if "compile_seconds" in r else ""), r.get("note", "")) if x) or None]
                 for r in s["results"]],
            ))  # fmt: skip
    if "retrieval" in sec:
        s = sec["retrieval"]
        md += ["", "## Retrieval (queries/s, top-50)", "", _meta(s), ""]
        if "error" in s:
            md.append(f"ERROR: {s['error']}")
        else:
            md += [f"Data: {s['data']}", "", f"Protocol: {s['protocol']}. faiss {s['faiss_version']}.", ""]
            if s.get("faiss_skipped"):
                md += [f"**{s['faiss_skipped']}.**", ""]
            md.append(_table(
                ["bank", "method", "options", "build s", "queries/s", "recall@50", "x exact torch", "others' cores"],
                [[r["bank_size"], r["method"], json.dumps(r.get("options")) if r.get("options") else r.get("skipped"),
                  r.get("build_seconds"), r.get("queries_per_s"), r.get("recall_at_50"), r.get("speedup_vs_exact_torch"), r.get("others_cpu_cores")]
                 for r in s["results"]],
            ))  # fmt: skip
            md += [
                "",
                "One slide batch (64 tiles, 250 genes): the bank prepared for every batch (`predict_from_embeddings`, "
                "predict-slide before this change) against once per slide (`BankRetriever`, predict-slide now):",
                "",
            ]
            md.append(_table(
                ["bank", "predict_from_embeddings ms (per batch: check, normalise, index)", "BankRetriever.predict ms (built once)", "tiles/s ceiling from retrieval"],
                [[r["bank_size"], r["predict_from_embeddings_ms"], r.get("bank_retriever_predict_ms", r.get("prebuilt_index_search_and_aggregate_ms")),
                  r["tiles_per_s_ceiling_from_retrieval"]] for r in s["slide_batch_retrieval"]],
            ))  # fmt: skip
    if "slide" in sec:
        s = sec["slide"]
        md += ["", "## Whole slide (predict-slide)", "", _meta(s), ""]
        if "error" in s:
            md.append(f"ERROR: {s['error']}")
        else:
            md += [s["setup"] + ".", ""]
            md.append(_table(
                ["preset", "side px", "tissue tiles", "tiles/s", "peak RSS MB", "above load-only MB", "others' cores", "exit"],
                [[r["preset"], r["side_px"], r.get("n_tissue_tiles"), r.get("tiles_per_second"), r.get("peak_rss_mb"),
                  r.get("peak_rss_above_load_only_mb"), r.get("others_cpu_cores"), r["exit"]] for r in s["results"]],
            ))  # fmt: skip
            md += ["", "Load-only children (import + model + bank): " + ", ".join(
                f"{k} {v['peak_rss_mb']} MB" for k, v in s["load_only_baseline"].items()) + "."]  # fmt: skip
            md += ["", "Large vs small slide: " + "; ".join(
                f"{k}: peak RSS x{v['peak_rss_ratio']} ({v['peak_rss_increase_mb']:+} MB) for x{v['area_ratio']} area" for k, v in s["large_vs_small"].items()) + "."]  # fmt: skip
    notes = report.get("notes")
    if notes:
        md += ["", "## Findings", "", *[f"- {n}" for n in notes]]
    path.write_text("\n".join(md) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- main
def worker(spec: dict) -> None:
    """A torch.compile measurement in its own process (see run_worker): compiled vs eager, interleaved."""
    kind = spec.pop("kind")
    if kind == "train":
        configs = {"baseline": {}, "torch.compile": {"compile": True}}
        res = measure_train(spec.pop("preset"), spec.pop("precision"), configs=configs, **spec)
    elif kind == "embed":
        configs = {
            "baseline bf16": {"precision": "bf16"},
            "torch.compile": {"precision": "bf16", "compile": True, "ref": "baseline bf16"},
        }
        res = measure_embed(spec.pop("preset"), configs=configs, **spec)
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    print(RESULT_MARK + json.dumps(res), flush=True)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="toy sizes, about a minute; writes results/speed_quick.json"
    )
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    ap.add_argument("--out", type=Path, help="results JSON (the .md is written next to it)")
    ap.add_argument("--workdir", type=Path, help="where the slide section writes its files (default: temp)")
    ap.add_argument(
        "--max-wait",
        type=float,
        default=0.0,
        help="before each measurement wait up to this many seconds for other processes to use < 0.3 cores",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    WAIT["max_s"] = args.max_wait
    if args.worker:
        worker(json.loads(args.worker))
        return
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    p = QUICK if args.quick else FULL
    out_path = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    report: dict[str, Any] = {"sections": {}}
    if out_path.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            report = json.loads(out_path.read_text(encoding="utf-8"))
    report.update({
        "benchmark": "speed",
        "description": __doc__.strip().splitlines()[0],
        "command": command_line(),
        "git_commit": git_commit(),
        "quick": bool(args.quick),
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
    })  # fmt: skip
    sections = report.setdefault("sections", {})
    t_start = time.perf_counter()
    load_start = loadavg()

    def save() -> None:
        report["targets"] = targets(sections, bool(args.quick))
        report["notes"] = findings(sections)
        write_json(out_path, report)
        write_markdown(out_path.with_suffix(".md"), report)

    peak = None
    needs_peak = any(s in wanted for s in ("peak", "train", "inference"))
    order = [s for s in SECTIONS if s in wanted or (s == "peak" and needs_peak)]
    for name in order:
        with section(name, sections) as out:
            try:
                if name == "peak":
                    peak = sec_peak(p, out)
                elif name == "train":
                    sec_train(p, peak, out)
                elif name == "inference":
                    sec_inference(p, peak, out)
                elif name == "retrieval":
                    sec_retrieval(p, out)
                elif name == "slide":
                    sec_slide(p, out, args.workdir)
            except Exception as exc:  # record and go on with the other sections
                import traceback

                traceback.print_exc()
                out["error"] = f"{type(exc).__name__}: {exc}"
        save()
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    report["load_average_start_end"] = [load_start, loadavg()]
    save()
    print(f"wrote {out_path} and {out_path.with_suffix('.md')} in {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
