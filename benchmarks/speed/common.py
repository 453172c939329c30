"""Shared settings and helpers of the speed benchmark: sizes, sections, timing, CPU meter, FLOPs."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from cmrcnet.models.config import ModelConfig
from cmrcnet.runtime import autocast_context

from _machine import git_commit, machine_info

HERE = Path(__file__).resolve().parents[1]  # benchmarks/
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
        cmd = [sys.executable, str(HERE / "speed.py"), "--worker", json.dumps(spec)]
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


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
