"""Training throughput (spots/s) per encoder preset in fp32 and bf16, with FLOPs per spot and the machine's
measured matmul peak, so each figure can be read as a fraction of the limit.

    python benchmarks/train_speed.py [--presets paper,cpu] [--batch-size 64] [--steps 4] [--genes 250]

Writes benchmarks/results/train_speed.json. Each measurement is a full training step of the cmrcnet method
(forward, backward, AdamW) on random inputs of the preset's size, timed over `--steps` steps after one warm-up
step; the median step time is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.flops import model_flops_per_spot
from cmrcnet.runtime import autocast_context

from _machine import git_commit, machine_info, matmul_peak_gflops

RESULTS = Path(__file__).resolve().parent / "results" / "train_speed.json"


def measure(preset: str, precision: str, *, method: str, batch: int, steps: int, genes: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, n_genes=genes, method=method)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size).contiguous(memory_format=torch.channels_last)
    expr = torch.rand(batch, genes) * 3
    device = torch.device("cpu")
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            loss = model(images, expr)["loss"]
        loss.backward()
        opt.step()
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    flops = model_flops_per_spot(cfg, training=True, batch_size=batch)
    return {
        "preset": preset,
        "method": method,
        "precision": precision,
        "batch_size": batch,
        "n_genes": genes,
        "step_seconds_median": round(step, 4),
        "step_seconds_all": [round(t, 4) for t in times],
        "spots_per_s": round(batch / step, 2),
        "train_gflop_per_spot": round(flops / 1e9, 3),
        "achieved_gflops": round(flops * batch / step / 1e9, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="paper,cpu")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--method", default="cmrcnet")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--genes", type=int, default=250)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    peak = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    print(f"matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    rows = []
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            row = measure(
                preset,
                precision,
                method=args.method,
                batch=args.batch_size,
                steps=args.steps,
                genes=args.genes,
            )
            row["fraction_of_matmul_peak"] = round(row["achieved_gflops"] / peak[precision], 3)
            rows.append(row)
            print(
                f"{preset:6s} {precision}: {row['spots_per_s']:7.1f} spots/s, {row['achieved_gflops']:6.0f} "
                f"GFLOP/s ({100 * row['fraction_of_matmul_peak']:.0f}% of the {precision} matmul peak)"
            )
    result = {
        "benchmark": "training throughput",
        "command": " ".join(["python", *sys.argv]),
        "commit": git_commit(),
        "machine": machine_info(),
        "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
