"""Device and precision helpers shared by training and inference.

Precision is chosen by measurement (`resolve_precision`): `auto` (every command's default) picks bf16 on a
CUDA GPU that supports it (fp16 with a gradient scaler on older GPUs) and, on the CPU, bf16 only where a short
GEMM probe finds bf16 matrix products faster than fp32 on this machine. CPUs without native bf16 (AVX2-only,
many laptops and servers) run bf16 matrix products 100x slower than fp32; CPUs with AVX512-BF16 or AMX run
them 3-4x faster. The probe's result is cached per CPU model, torch version and thread count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from cmrcnet.errors import ConfigError

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")  # what a model runs in
PRECISION_CHOICES = ("auto", *PRECISIONS)  # what a user may ask for
# bf16 must be at least this much faster than fp32 in the probe before `auto` picks it on a CPU
CPU_BF16_MIN_SPEEDUP = 1.5
PROBE_FORMAT = "cmrcnet-gemm-probe-1"
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# settings that change which kernels torch, oneDNN and MKL use, hence the probe's answer
ISA_ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The compute context of every model call: mixed precision (bf16 on CPU or CUDA, fp16 on CUDA only, nothing
    for fp32) and, when training on the CPU (gradients enabled), the plain ("math") attention kernel.

    `precision` is a resolved precision (see `resolve_precision`), not "auto".

    For our short sequences (50 tokens) the math kernel's backward was faster than torch's fused CPU attention in
    standalone paired checks during development on a 2-core EPYC (bf16 training x1.05-1.09 paper preset, x1.24 cpu
    preset); the committed full run (benchmarks/results/speed.md) shows x1.00, so the gain is small at best. For
    inference the two are within a few percent and torch's default is kept.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 mixed precision needs CUDA; use precision bf16 or fp32 on the CPU")
    return _compute_context(device, precision)


@contextlib.contextmanager
def _compute_context(device: torch.device, precision: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if device.type == "cpu" and torch.is_grad_enabled():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
        yield


# --- the machine ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(CPU model, flags) from /proc/cpuinfo, read once per process: they do not change while it runs."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or "unknown", frozenset(flags)


def cpu_description() -> dict:
    """The CPU as benchmarks and probes record it: model, the flags that decide precision speed, torch's
    dispatch capability and thread count (the last two read afresh: settings can change them)."""
    model, flags = _cpuinfo()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # torch < 2.1
        capability = "unknown"
    return {
        "cpu": model,
        "flags": {f: f in flags for f in CPU_FLAGS_OF_INTEREST},
        "torch_cpu_capability": capability,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
    }


def cpu_line(desc: dict | None = None) -> str:
    """One line for logs and benchmark headers, e.g. 'AMD EPYC; avx2 avx512f avx512_bf16; torch AVX512'."""
    d = desc or cpu_description()
    flags = " ".join(f for f, on in d["flags"].items() if on) or "no avx2"
    return f"{d['cpu']}; {flags}; torch {d['torch']} capability {d['torch_cpu_capability']}; {d['threads']} threads"


# --- the GEMM probe -------------------------------------------------------------------------------------------
def _measure_gemm(dtype: torch.dtype, *, n: int = 256, budget_s: float = 0.05) -> float:
    """GFLOP/s of an n x n x n matrix product in `dtype` on the CPU, timed for about `budget_s` after a warm-up
    (one product when a single one already takes longer)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    a @ b  # warm-up (allocations, kernel selection)
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= budget_s:
            break
    return 2.0 * n**3 * reps / elapsed / 1e9


def probe_cache_path() -> Path:
    """$CMRCNET_CACHE/gemm_probe.json, else $XDG_CACHE_HOME or ~/.cache, then cmrcnet/gemm_probe.json."""
    if os.environ.get("CMRCNET_CACHE"):
        return Path(os.environ["CMRCNET_CACHE"]) / "gemm_probe.json"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cmrcnet" / "gemm_probe.json"


_PROBES: dict[str, dict] = {}  # this process's probes, by machine key


def _machine_key(desc: dict) -> str:
    flags = ",".join(f for f, on in desc["flags"].items() if on)
    env = ",".join(f"{k}={os.environ[k]}" for k in ISA_ENVIRONMENT if os.environ.get(k))
    key = f"{desc['cpu']}|{flags}|{desc['torch_cpu_capability']}|torch {desc['torch']}|{desc['threads']} threads"
    return f"{key}|{env}" if env else key


def cpu_gemm_probe(*, use_cache: bool = True) -> dict:
    """Measured fp32 and bf16 GEMM speed of this CPU: {"fp32_gflops", "bf16_gflops", "bf16_speedup", "cpu",
    "cached", ...}. Cached in memory and in `probe_cache_path()` per CPU model, flags, torch version and
    thread count; a damaged cache file is ignored and rewritten."""
    desc = cpu_description()
    key = _machine_key(desc)
    if use_cache and key in _PROBES:
        return {**_PROBES[key], "cached": True}
    path = probe_cache_path()
    stored: dict = {}
    if use_cache:
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(stored, dict) or stored.get("format") != PROBE_FORMAT:
                stored = {}
        except (OSError, ValueError):
            stored = {}
        machines = stored.get("machines")
        hit = machines.get(key) if isinstance(machines, dict) else None
        if isinstance(hit, dict) and {"fp32_gflops", "bf16_gflops"} <= set(hit):
            _PROBES[key] = hit
            return {**hit, "cached": True}
    fp32 = _measure_gemm(torch.float32)
    bf16 = _measure_gemm(torch.bfloat16)
    result = {
        "fp32_gflops": round(fp32, 2),
        "bf16_gflops": round(bf16, 2),
        "bf16_speedup": round(bf16 / max(fp32, 1e-9), 4),
        "gemm": "256x256x256",
        "cpu": cpu_line(desc),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _PROBES[key] = result
    if use_cache:
        _store_probe(path, stored, key, result)
    return {**result, "cached": False}


def _store_probe(path: Path, stored: dict, key: str, result: dict) -> None:
    """Add one machine's probe to the cache file (atomically; a cache that cannot be written is skipped)."""
    from cmrcnet.atomic import write_json

    machines = dict(stored.get("machines", {})) if isinstance(stored.get("machines"), dict) else {}
    machines[key] = result
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"format": PROBE_FORMAT, "machines": machines})
    except OSError as exc:
        logger.debug("could not write the GEMM probe cache %s: %s", path, exc)


# --- choosing a precision -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """The precision a command runs in, what was asked for, and why (recorded in run.json and predictions)."""

    requested: str
    precision: str
    reason: str
    probe: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_LOGGED: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.log(level, message)


def check_precision(requested: str, *, option: str = "precision") -> str:
    """`requested` if it is one of PRECISION_CHOICES, else a ConfigError naming `option` and the allowed values."""
    if requested not in PRECISION_CHOICES:
        raise ConfigError(f"{option} must be one of {', '.join(PRECISION_CHOICES)}; got {requested!r}")
    return requested


def resolve_precision(
    requested: str, device: torch.device | str, *, training: bool = False
) -> PrecisionChoice:
    """The precision to run in on `device` for a user's `requested` one ("auto", "fp32", "bf16" or "fp16").

    auto, CUDA: bf16 where the GPU supports it, else fp16 (training then uses a gradient scaler).
    auto, CPU: bf16 only where `cpu_gemm_probe` measures bf16 GEMMs at least CPU_BF16_MIN_SPEEDUP x faster than
    fp32, else fp32. An explicit bf16 on a CPU where the probe finds it slower runs, with a warning that quotes
    the measured speeds. The choice is logged once per process.
    """
    check_precision(requested)
    device = torch.device(device)
    if device.type == "cuda":
        return _resolve_cuda(requested, device, training=training)
    if requested == "fp16":
        raise ConfigError("fp16 mixed precision needs CUDA; use precision auto, bf16 or fp32 on the CPU")
    if requested == "fp32":
        return PrecisionChoice("fp32", "fp32", "requested")
    probe = cpu_gemm_probe()
    speeds = (
        f"bf16 GEMM {probe['bf16_gflops']:.1f} vs fp32 {probe['fp32_gflops']:.1f} GFLOP/s on this CPU "
        f"({probe['cpu']})"
    )
    if requested == "bf16":
        if probe["bf16_speedup"] < 1.0:
            _log_once(
                logging.WARNING,
                f"precision bf16 was requested, but this CPU has no fast bf16: {speeds}, "
                f"x{probe['bf16_speedup']:.3f}; precision auto would run fp32",
            )
        return PrecisionChoice("bf16", "bf16", f"requested; {speeds}", probe)
    chosen = "bf16" if probe["bf16_speedup"] >= CPU_BF16_MIN_SPEEDUP else "fp32"
    reason = speeds
    _log_once(logging.INFO, f"precision auto -> {chosen}: {reason}")
    return PrecisionChoice("auto", chosen, reason, probe)


def _resolve_cuda(requested: str, device: torch.device, *, training: bool) -> PrecisionChoice:
    if requested in ("fp32", "fp16"):
        return PrecisionChoice(requested, requested, "requested")
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "CUDA device"
    supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if requested == "bf16":
        if not supported:
            raise ConfigError(f"{name} does not support bf16; use precision auto, fp16 or fp32")
        return PrecisionChoice("bf16", "bf16", "requested")
    if supported:
        reason = f"{name} supports bf16"
        chosen = "bf16"
    else:
        chosen = "fp16"
        reason = f"{name} has no bf16: fp16" + (" with a gradient scaler" if training else "")
    _log_once(logging.INFO, f"precision auto -> {chosen}: {reason}")
    return PrecisionChoice("auto", chosen, reason)
