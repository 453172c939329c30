"""Throughput and peak memory of a ViT-L (UNI-size) feature extraction on the CPU (issue 15).

    python benchmarks/foundation_encoders.py [--encoder uni] [--batch 8] [--batches 3]

For fp32 and for the precision `--precision auto` picks on this machine, each in a child process (so that its
peak resident memory is its own): build the encoder at full size (random weights: speed and memory do not depend
on the values), run one warm-up batch, then time `--batches` batches of `--batch` 224 px images through the same
call the frozen-feature cache makes (eval mode, no gradients, `autocast_context`). Records images/s, seconds per
batch, the process's peak RSS and the model's parameter memory, with command, commit and machine.

A benchmark, not a test. It is short on purpose: a few batches on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
RESULTS = HERE / "results" / "foundation_encoders"


def measure(encoder: str, precision: str, batch: int, batches: int) -> dict:
    """In a child process: one precision's throughput and peak memory."""
    import torch

    from cmrcnet.models.foundation import FOUNDATION_SPECS
    from cmrcnet.runtime import autocast_context, resolve_precision

    device = torch.device("cpu")
    resolved = resolve_precision(precision, device).precision
    spec = FOUNDATION_SPECS[encoder]
    t0 = time.perf_counter()
    model = spec.build().eval()
    build_s = time.perf_counter() - t0
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, 3, spec.img_size, spec.img_size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.no_grad():
        for i in range(batches + 1):  # the first batch warms up
            t = time.perf_counter()
            with autocast_context(device, resolved):
                out = model(x)
            if i:
                times.append(time.perf_counter() - t)
    return {
        "requested": precision,
        "precision": resolved,
        "params_millions": round(params / 1e6, 2),
        "param_memory_mib": round(params * 4 / 2**20, 1),
        "build_seconds": round(build_s, 2),
        "rss_after_build_mib": round(rss_model, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "batch": batch,
        "seconds_per_batch": [round(t, 3) for t in times],
        "images_per_s": round(batch * len(times) / sum(times), 3),
        "output_shape": list(out.shape),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="uni", help="registry name (default uni: ViT-L/16)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="result path without suffix")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.encoder, args.child, args.batch, args.batches)))
        return 0
    from cmrcnet.atomic import write_json, write_text

    from _machine import git_commit, machine_info

    t0 = time.perf_counter()
    runs = []
    for precision in ("fp32", "auto"):
        cmd = [sys.executable, __file__, "--child", precision, "--encoder", args.encoder]
        cmd += ["--batch", str(args.batch), "--batches", str(args.batches)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    result = {
        "command": shlex.join(["python", "benchmarks/foundation_encoders.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine_info(),
        "encoder": args.encoder,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(args.out.with_suffix(".json"), result)
    m = result["machine"]
    lines = [
        f"# {args.encoder} feature extraction on the CPU",
        "",
        f"Written by `{result['command']}` (commit {result['commit']}) in {result['seconds']} s on {m['cpu_line']} "
        f"({m['cores']} cores); load average at start {m['load_average_at_start']}. Full-size model, random "
        f"weights, {args.batch} images of 224 px per batch, {args.batches} timed batches after one warm-up, eval "
        "mode without gradients under cmrcnet's autocast (the frozen-feature cache's call). Peak memory: the "
        "child process's peak resident set (Python, torch, model and activations).",
        "",
        "| precision | params (M) | weights fp32 MiB | images/s | s per batch | RSS after build MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        label = r["precision"] + (" (auto)" if r["requested"] == "auto" else "")
        lines.append(
            f"| {label} | {r['params_millions']} | {r['param_memory_mib']} | {r['images_per_s']} | "
            f"{', '.join(map(str, r['seconds_per_batch']))} | {r['rss_after_build_mib']} | {r['peak_rss_mib']} |"
        )
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
