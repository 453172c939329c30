"""Section slide: `cmrcnet predict-slide` in a child process on synthetic pyramidal TIFFs."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, CpuMeter, wait_quiet


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
        run_dir=root / f"run_{preset}",
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
