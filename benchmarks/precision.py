"""`--precision auto` on the machine at hand and on the same machine limited to AVX2 (no native bf16).

    python benchmarks/precision.py [--modes native,avx2] [--out benchmarks/results/precision.json]

For each CPU mode, in child processes (the mode is set through the environment before torch starts):

- the GEMM probe and what `auto` picks (a fresh probe cache per mode);
- the README's demo command, `cmrcnet demo --out DIR`, timed as a whole (its default precision is auto);
- `cmrcnet train --config cpu` on the demo's three SYNTHETIC training slides, 3 epochs, at the default
  precision and with `--precision fp32`: spots/s of the last epoch (metrics.csv);
- `cmrcnet predict-slide` with the demo's cpu-preset run on a synthetic pyramidal TIFF (4096 px, read at
  2 um/px: 1,898 tissue tiles, each read at 56 px and enlarged to 224) at the default precision and fp32:
  tiles/s against the encoder's FLOP ceiling of the precision used (matmul peak / GFLOP per tile), and
  `embed_images` alone on the same tiles.

Mode "avx2" sets ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2: torch,
oneDNN and MKL then use AVX2 kernels only, so bf16 matrix products run as slowly as on a CPU without native
bf16 (measured: 2.4 GFLOP/s against fp32's 150-190). It emulates such a CPU; it is not one.

A benchmark, not a test: it records the command, commit, machine and load next to the numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from cmrcnet.atomic import write_json, write_text

from _machine import git_commit, machine_info

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "precision.json"
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
SLIDE_SIDE, SLIDE_UM = 4096, 2.0  # read at 2 um/px: 56 px tiles
EPOCHS = 3

CHILD_INFO = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from _machine import machine_info, matmul_peak_gflops
info = machine_info()
info["matmul_peak_gflops"] = {"fp32": round(matmul_peak_gflops(torch.float32), 1),
                              "bf16": round(matmul_peak_gflops(torch.bfloat16, max_product_s=1.0), 1)}
print("RESULT " + json.dumps(info))
"""

CHILD_EMBED = """
import json, sys, time, numpy as np, torch
from cmrcnet.run.load import load_trained_model
from cmrcnet.inference.predict import embed_patches
from cmrcnet.data.slide_reader import read_tile
from cmrcnet.data.slide_reader import open_slide
run, slide, um, precision = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
tm = load_trained_model(run)
fov = 112.0 / um
with open_slide(slide) as r:
    w, h = r.dimensions
    cs = [(x, y) for y in np.arange(fov, h - fov, fov) for x in np.arange(fov, w - fov, fov)][:1024]
    tiles = torch.from_numpy(np.stack([read_tile(r, 0, cx, cy, fov, 224) for cx, cy in cs]))
embed_patches(tm, tiles[:64], batch_size=64, precision=precision)
t0 = time.perf_counter()
embed_patches(tm, tiles, batch_size=64, precision=precision)
print("RESULT " + json.dumps({"patches_per_s": round(len(tiles) / (time.perf_counter() - t0), 1)}))
"""


def child_env(mode: str, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AVX2_ENV}
    env["CMRCNET_CACHE"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(HERE.parent / "src"), env.get("PYTHONPATH")) if x)
    if mode == "avx2":
        env.update(AVX2_ENV)
    return env


def run(cmd: list[str], env: dict[str, str], *, timeout: int = 1200) -> tuple[float, str]:
    """Run `cmd` to the end; (wall seconds, stdout). A failure stops the benchmark with its stderr."""
    print("  $ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(cmd)}\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def result_line(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def last_epoch_rate(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return round(float(rows[-1]["spots_per_s"]), 2)


def measure_mode(mode: str, root: Path, slide: Path) -> dict:
    from cmrcnet.models.config import ModelConfig

    from speed import embed_flops_per_patch

    cache = root / f"cache_{mode}"
    env = child_env(mode, cache)
    py = sys.executable
    out: dict = {"mode": mode, "environment": {k: env[k] for k in AVX2_ENV if k in env}}
    _, stdout = run([py, "-c", CHILD_INFO, str(HERE)], env)
    out["machine"] = result_line(stdout)
    auto = out["machine"]["precision_auto"]
    print(f"  {mode}: {out['machine']['cpu_line']}; auto -> {auto}", flush=True)

    demo = root / f"demo_{mode}"
    seconds, _ = run(["cmrcnet", "demo", "--out", str(demo), "--quiet"], env)
    demo_run = json.loads((demo / "run" / "run.json").read_text())
    out["demo"] = {"command": f"cmrcnet demo --out {demo.name}", "wall_seconds": round(seconds, 1),
                   "precision": demo_run["precision"]}  # fmt: skip
    print(f"  demo: {seconds:.1f} s ({demo_run['precision']['precision']})", flush=True)

    samples = ",".join(demo_run["train_samples"])
    train = {}
    for label, extra in (("default", []), ("fp32", ["--precision", "fp32"])):
        dest = root / f"train_{mode}_{label}"
        cmd = ["cmrcnet", "train", "--data", str(demo / "dataset"), "--train-samples", samples,
               "--config", "cpu", "--epochs", str(EPOCHS), "--out", str(dest), "--quiet", *extra]  # fmt: skip
        seconds, _ = run(cmd, env)
        info = json.loads((dest / "run.json").read_text())
        train[label] = {"precision": info["precision"]["precision"], "spots_per_s_last_epoch": last_epoch_rate(dest),
                        "wall_seconds": round(seconds, 1), "n_train_spots": info["n_train_spots"]}  # fmt: skip
        print(f"  train {label}: {train[label]}", flush=True)
    train["default_over_fp32"] = round(
        train["default"]["spots_per_s_last_epoch"] / train["fp32"]["spots_per_s_last_epoch"], 3
    )
    out["train"] = train

    gflop = embed_flops_per_patch(ModelConfig.from_preset("cpu", n_genes=250, method="cmrcnet")) / 1e9
    slide_rows = {}
    for label, precision in (("default", "auto"), ("fp32", "fp32")):
        dest = root / f"slide_{mode}_{label}"
        cmd = ["cmrcnet", "predict-slide", "--model", str(demo / "run"), "--slide", str(slide),
               "--pixel-size", str(SLIDE_UM), "--out", str(dest), "--quiet", "--precision", precision]  # fmt: skip
        seconds, _ = run(cmd, env)
        summary = json.loads((dest / "summary.json").read_text())
        used = summary.get("precision") or (auto if precision == "auto" else precision)
        ceiling = out["machine"]["matmul_peak_gflops"][used] / gflop
        _, stdout = run([py, "-c", CHILD_EMBED, str(demo / "run"), str(slide), str(SLIDE_UM), used], env)
        embed = result_line(stdout)["patches_per_s"]
        slide_rows[label] = {
            "precision": used,
            "n_tissue_tiles": summary["n_tissue_tiles"],
            "tiles_per_second": summary["tiles_per_second"],
            "ceiling_tiles_per_s": round(ceiling, 1),
            "fraction_of_ceiling": round(summary["tiles_per_second"] / ceiling, 3),
            "embed_images_patches_per_s": embed,
            "embed_fraction_of_ceiling": round(embed / ceiling, 3),
        }
        print(f"  slide {label}: {slide_rows[label]}", flush=True)
    out["slide"] = {"encoder_gflop_per_tile": round(gflop, 4), **slide_rows}
    return out


def write_markdown(path: Path, report: dict) -> None:
    lines = [
        "# `--precision auto`: default against fp32, on this CPU and on it limited to AVX2",
        "",
        f"Written by `{report['command']}` (commit {report['commit']}) in {report['wall_seconds']} s; load average "
        f"{report['load_average_start_end']}. Mode avx2 emulates a CPU without native bf16 through "
        f"{', '.join(f'{k}={v}' for k, v in AVX2_ENV.items())}.",
        "",
        "| mode | CPU | probe fp32 / bf16 GFLOP/s | auto | demo s | train default spots/s | train fp32 spots/s "
        "| default / fp32 | slide default tiles/s (of ceiling) | slide fp32 tiles/s (of ceiling) | embed alone fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in report["modes"]:
        mc, pr, tr, sl = m["machine"], m["machine"]["precision_probe"], m["train"], m["slide"]
        lines.append(
            f"| {m['mode']} | {mc['cpu_line']} | {pr['fp32_gflops']} / {pr['bf16_gflops']} | {mc['precision_auto']} "
            f"| {m['demo']['wall_seconds']} | {tr['default']['spots_per_s_last_epoch']} ({tr['default']['precision']}) "
            f"| {tr['fp32']['spots_per_s_last_epoch']} | x{tr['default_over_fp32']} "
            f"| {sl['default']['tiles_per_second']} {sl['default']['precision']} "
            f"({100 * sl['default']['fraction_of_ceiling']:.0f}% of {sl['default']['ceiling_tiles_per_s']}) "
            f"| {sl['fp32']['tiles_per_second']} ({100 * sl['fp32']['fraction_of_ceiling']:.0f}% of "
            f"{sl['fp32']['ceiling_tiles_per_s']}) | {sl['fp32']['embed_images_patches_per_s']} "
            f"({100 * sl['fp32']['embed_fraction_of_ceiling']:.0f}%) |"
        )  # fmt: skip
    lines += [
        "",
        "Training: `cmrcnet train --config cpu` on the demo's SYNTHETIC training slides, last of "
        f"{EPOCHS} epochs. Slide: `cmrcnet predict-slide` on a synthetic {SLIDE_SIDE} px TIFF read at {SLIDE_UM} "
        "um/px with the demo's run; ceiling = the mode's measured matmul peak of the precision used / the cpu "
        "encoder's GFLOP per tile; 'embed alone' = `embed_patches` on 1,024 of the same tiles already in memory.",
    ]
    write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="native,avx2", help="comma-separated: native, avx2")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--workdir", type=Path, help="where demos, runs and the slide go (default: a temp folder)"
    )
    args = ap.parse_args()
    from slide_memory import write_slide

    t0 = time.perf_counter()
    load0 = os.getloadavg()
    report = {
        "benchmark": "precision auto vs fp32",
        "command": shlex.join(["python", "benchmarks/precision.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine_info(),
        "modes": [],
    }
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="precision_") as tmp:
        root = Path(tmp)
        slide = root / f"slide_{SLIDE_SIDE}.tif"
        write_slide(slide, SLIDE_SIDE, pixel_size_um=0.5, pyramid=True)
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            print(f"== {mode}", flush=True)
            report["modes"].append(measure_mode(mode, root, slide))
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    report["load_average_start_end"] = [list(load0), list(os.getloadavg())]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    write_markdown(args.out.with_suffix(".md"), report)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
