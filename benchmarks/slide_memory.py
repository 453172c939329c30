"""Peak memory and speed of `cmrcnet predict-slide` on synthetic slides of two sizes (4x the area).

    python benchmarks/slide_memory.py [--run RUN_DIR] [--side 8192] [--pixel-size 0.5] [--no-flat]

Writes synthetic tiled TIFFs (zlib) whose tissue covers the same fraction of the slide at both sizes: a pyramid
(levels 1, 1/2, ... down to about 512 px, in SubIFDs) and, unless --no-flat, a single-level ("flat") TIFF where
every tile and the thumbnail must come from full resolution. Each `predict-slide` runs in its own subprocess;
its peak RSS is the rusage of that child alone, read by a lean wrapper process (see `_WRAPPER`). A baseline
child that only imports the package and loads the model and bank gives the fixed cost. Without --run, a tiny run (tiny preset, 1 epoch, synthetic
data) is trained first. Results: benchmarks/results/slide_memory.json.

A benchmark, not a test: numbers depend on the machine and its load (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cmrcnet.atomic import write_json

from _machine import git_commit, machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "slide_memory.json"
TILE = 256  # TIFF tile side
# tissue: ellipses in fractions of the slide (centre x, centre y, radius x, radius y), so both sizes match
ELLIPSES = ((0.35, 0.45, 0.25, 0.30), (0.72, 0.60, 0.18, 0.22))


def paint_tile(level_ds: float, ty: int, tx: int, width: int, height: int, seed: int) -> np.ndarray:
    """Tile (ty, tx) of the level with downsample `level_ds` of a width x height (full-res) synthetic slide."""
    rng = np.random.default_rng((seed, int(level_ds), ty, tx))
    yy, xx = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    fx = ((tx * TILE + xx + 0.5) * level_ds) / width  # (TILE, TILE) position in fractions of the slide
    fy = ((ty * TILE + yy + 0.5) * level_ds) / height
    inside = np.zeros((TILE, TILE), dtype=bool)
    for cx, cy, rx, ry in ELLIPSES:
        inside |= ((fx - cx) / rx) ** 2 + ((fy - cy) / ry) ** 2 <= 1.0
    t = np.clip(fx, 0, 1)[..., None]  # pink (left) -> purple (right)
    tissue = (1 - t) * np.array([235, 150, 190], np.float32) + t * np.array([130, 70, 170], np.float32)
    # cell-like texture: a few dark dots per tile at full resolution, fewer visible at coarser levels
    tissue = tissue - 60 * (np.sin(fx * width / 9.0) * np.sin(fy * height / 7.0) > 0.8)[..., None]
    glass = np.full((TILE, TILE, 3), 244, np.float32)
    img = np.where(inside[..., None], tissue, glass) + rng.integers(-4, 5, (TILE, TILE, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_slide(path: Path, side: int, *, pixel_size_um: float, pyramid: bool, seed: int = 0) -> None:
    """A side x side tiled TIFF with the pixel size in its resolution tags, written tile by tile."""
    import tifffile

    width = height = side
    levels = [1]
    while pyramid and side // (levels[-1] * 2) >= 512:
        levels.append(levels[-1] * 2)

    def tiles(ds: int):
        w, h = -(-width // ds), -(-height // ds)
        for ty in range(-(-h // TILE)):
            for tx in range(-(-w // TILE)):
                yield paint_tile(ds, ty, tx, width, height, seed)

    opts = dict(tile=(TILE, TILE), photometric="rgb", compression="zlib", dtype=np.uint8)
    res = dict(resolution=(1e4 / pixel_size_um, 1e4 / pixel_size_um), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(1), shape=(height, width, 3), subifds=len(levels) - 1, **res, **opts)
        for ds in levels[1:]:
            tw.write(tiles(ds), shape=(-(-height // ds), -(-width // ds), 3), subfiletype=1, **opts)


# A lean wrapper process runs each command and reports its child's peak RSS. Measuring from this (large)
# process directly would be wrong: Linux carries the parent's peak RSS into a forked/vforked child's ru_maxrss
# at exec, so every child would look at least as large as this process. The wrapper is a bare Python (~10 MB).
_WRAPPER = """
import resource, subprocess, sys, time
log, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
with open(log, "w") as fh:
    rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t0)
"""


def run_child(cmd: list[str]) -> tuple[int, float, float]:
    """Run `cmd`; return (exit code, peak RSS in MiB of that process alone, wall seconds)."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        out = subprocess.run(
            [sys.executable, "-S", "-c", _WRAPPER, log.name, *cmd], capture_output=True, text=True, check=True
        ).stdout.split()
        rc, maxrss_kib, seconds = int(out[-3]), int(out[-2]), float(out[-1])
        if rc != 0:
            print(log.read(), file=sys.stderr)
    return rc, maxrss_kib / 1024.0, seconds  # ru_maxrss is in KiB on Linux


def train_tiny_run(root: Path) -> Path:
    from cmrcnet.data.prepare import prepare_sample
    from cmrcnet.data.synthetic import SyntheticConfig, make_synthetic_samples
    from cmrcnet.run.config import load_run_config
    from cmrcnet.workflows.train import train_run

    ds = root / "ds"
    for s in make_synthetic_samples(
        SyntheticConfig(n_slides=2, n_patients=1, n_rows=6, n_cols=6, n_genes=30)
    ):
        prepare_sample(s, ds, patch_px=32, progress=False)
    cfg = load_run_config("tiny")
    cfg.train.epochs = 1
    train_run(data_dir=ds, train_samples=["synS1", "synS2"], run_dir=root / "run", config=cfg, progress=False)
    return root / "run"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="trained run folder (default: train a tiny one)")
    ap.add_argument("--side", type=int, default=8192, help="side of the smaller slide in px (default 8192)")
    ap.add_argument("--pixel-size", type=float, default=0.5, help="um per pixel of the slides (default 0.5)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--no-flat", action="store_true", help="skip the single-level TIFFs")
    ap.add_argument("--workdir", type=Path, help="where to write slides (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    info = machine_info()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        run = args.run or train_tiny_run(root)
        python = sys.executable
        baseline_cmd = [
            python,
            "-c",
            "import sys; from cmrcnet.inference import slide; from cmrcnet.run.load import "
            "load_trained_model; from cmrcnet.inference.bank import load_bank; "
            "t = load_trained_model(sys.argv[1]); load_bank(sys.argv[1], t)",
            str(run),
        ]
        rc, base_rss, base_s = run_child(baseline_cmd)
        assert rc == 0, "baseline failed"
        results = []
        kinds = ["pyramid"] + ([] if args.no_flat else ["flat"])
        for kind in kinds:
            for side in (args.side, 2 * args.side):
                slide = root / f"{kind}_{side}.tif"
                t0 = time.perf_counter()
                write_slide(slide, side, pixel_size_um=args.pixel_size, pyramid=kind == "pyramid")
                write_s = time.perf_counter() - t0
                out = root / f"out_{kind}_{side}"
                cmd = [
                    python, "-m", "cmrcnet", "predict-slide", "--model", str(run), "--slide", str(slide),
                    "--out", str(out), "--quiet", "--batch-size", str(args.batch_size),
                ]  # fmt: skip
                rc, rss, seconds = run_child(cmd)
                if rc != 0:
                    raise SystemExit(f"predict-slide failed on {slide}")
                summary = json.loads((out / "summary.json").read_text())
                row = {
                    "kind": kind,
                    "side_px": side,
                    "megapixels": round(side * side / 1e6, 1),
                    "raw_rgb_mb": round(side * side * 3 / 2**20, 1),
                    "file_mb": round(slide.stat().st_size / 2**20, 1),
                    "write_seconds": round(write_s, 1),
                    "peak_rss_mb": round(rss, 1),
                    "peak_rss_above_baseline_mb": round(rss - base_rss, 1),
                    "wall_seconds": round(seconds, 2),
                    "n_grid_tiles": summary["n_grid_tiles"],
                    "n_tissue_tiles": summary["n_tissue_tiles"],
                    "tiles_per_second": summary["tiles_per_second"],
                    "level": summary["level"],
                    "level_downsample": summary["level_downsample"],
                    "command": shlex.join(["cmrcnet", *cmd[3:]]),
                }
                print(json.dumps(row), flush=True)
                results.append(row)
                slide.unlink()
        ratios = {}
        for kind in kinds:
            small, large = [r for r in results if r["kind"] == kind]
            ratios[kind] = {
                "area_ratio": 4.0,
                "tissue_tile_ratio": round(large["n_tissue_tiles"] / small["n_tissue_tiles"], 2),
                "peak_rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                "peak_rss_increase_mb": round(large["peak_rss_mb"] - small["peak_rss_mb"], 1),
            }
    report = {
        "benchmark": "slide_memory",
        "description": __doc__.strip().splitlines()[0],
        "machine": info,
        "git_commit": git_commit(),
        "script": "python " + shlex.join(["benchmarks/slide_memory.py", *sys.argv[1:]]),
        "model": "tiny preset, 1 epoch on synthetic data" if args.run is None else str(args.run),
        "pixel_size_um": args.pixel_size,
        "baseline": {
            "what": "import cmrcnet.inference.slide + load model and bank",
            "peak_rss_mb": round(base_rss, 1),
            "seconds": round(base_s, 2),
        },
        "runs": results,
        "large_vs_small": ratios,
    }
    write_json(args.out, report)
    print(json.dumps(ratios, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
