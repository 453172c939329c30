"""Machine description and matmul peak shared by the benchmark scripts.

Every result records the CPU model, the flags that decide bf16 speed (avx2, avx512f, avx512_bf16, amx), torch's
CPU capability and the GEMM probe behind `--precision auto` (cmrcnet.runtime), so numbers from different
machines are never mixed unknowingly.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

import torch

from cmrcnet.runtime import cpu_description, cpu_gemm_probe, cpu_line, resolve_precision


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # a copy of the tree without .git (e.g. a GPU machine)
        return os.environ.get("CMRCNET_COMMIT", "unknown")


def provenance(script: str, argv: list[str] | None, machine: dict) -> dict:
    """The fields every result file starts with: the command as run, the commit, the machine, the load at the end."""
    args = argv if argv is not None else sys.argv[1:]
    return {"command": " ".join(["python", f"benchmarks/{script}", *args]), "commit": git_commit(),
            "machine": machine, "load_average_at_end": list(os.getloadavg())}


def machine_info() -> dict:
    desc = cpu_description()
    probe = cpu_gemm_probe()
    return {
        "cpu": desc["cpu"],
        "cpu_line": cpu_line(desc),
        "cpu_flags": desc["flags"],
        "torch_cpu_capability": desc["torch_cpu_capability"],
        "precision_probe": {k: probe[k] for k in ("fp32_gflops", "bf16_gflops", "bf16_speedup", "gemm")},
        "precision_auto": resolve_precision("auto", "cpu").precision,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def matmul_peak_gflops(
    dtype: torch.dtype,
    *,
    sizes: tuple[int, ...] = (1024, 2048, 4096),
    repeats: int = 5,
    max_product_s: float = 2.0,
) -> float:
    """Best GFLOP/s of square matmuls over `sizes` and `repeats` on the CPU (the machine's practical limit).

    Sizes stop growing once one product takes longer than `max_product_s` (bf16 on a CPU without native bf16
    runs at about 1 GFLOP/s: one 4096^3 product would take two minutes)."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        t0 = time.perf_counter()
        a @ b  # warm-up
        slow = time.perf_counter() - t0 > max_product_s
        for _ in range(1 if slow else repeats):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        if slow:
            break
    return best
