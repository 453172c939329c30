"""Whole-slide prediction on her2st C2 compared with its measured spots (ERBB2 and the breast markers).

    python benchmarks/her2st_slide.py --data PREPARED_DIR --run RUN_DIR [--sample C2] [--image C2.jpg]
        [--step-um UM] [--min-tissue 0.5] [--batch-size 64] [--precision bf16] [--device cpu] [--workdir DIR]

Intended experiment: train on C3-C6 (`cmrcnet train --train-samples C3,C4,C5,C6`), build the bank from them, then
run this script, which
1. runs `predict-slide` on the C2 image at C2's pixel size from PREPARED_DIR/metadata/C2.json "pixel_size_um"
   (the image is taken from that metadata's source, else ../shared/data/her2st/images/C2.jpg);
2. samples the tile predictions at C2's measured spot centres (the tile containing each spot: nearest tile
   centre within half a tile);
3. correlates them (Pearson, across spots) with the measured log1p expression (library size normalised with the
   run's target_sum) for ERBB2 and every breast-cancer marker the model predicts, and the tumour score with the
   same score computed from the measured markers;
4. records runtime, tiles/s and the correlations in benchmarks/results/slide.json (with machine and command).

`--add-inset` first pastes, on a copy of the image in a temporary folder (never the repository), what exports of
annotated slides carry beside the tissue: a white annotation legend with coloured class squares (top left) and a
1/4-size miniature of the slide with a green annotation circle in a white frame (top right), each at least 10 px
from the tissue's bounding box side they face (checked). `--keep-all-objects` is predict-slide's option that keeps
such objects as tissue.

Tiles are laid on the slide's own grid, not on the spots, so a spot is compared with the tile that contains it
(its centre is up to half a tile away): this measures the whole-slide path, not patch-level accuracy (for that,
use `cmrcnet predict` + `cmrcnet evaluate` on the prepared patches).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cmrcnet.atomic import write_json
from cmrcnet.constants import DEFAULT_SMOOTH
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.genes import expression_matrix
from cmrcnet.data.markers import BREAST_CANCER_MARKERS, BREAST_TUMOUR_MARKERS
from cmrcnet.data.stain import DEFAULT_STAIN_RULE, STAIN_RULES
from cmrcnet.data.tissue import TissueConfig, detect_tissue
from cmrcnet.evaluation.localisation import match_points, tumour_score
from cmrcnet.inference.slide import predict_slide

from _machine import git_commit, machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "slide.json"
SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st" / "images"


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation, None when either side is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.std() < 1e-12 or b.std() < 1e-12:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def with_inset(image: Path, out: Path, pixel_size: float) -> Path:
    """A PNG copy of `image` with an annotation legend (top left) and a framed miniature (top right) pasted in the
    corners; an error if either would come within 10 px of the tissue (found on the unmodified image)."""
    from PIL import Image, ImageDraw

    Image.MAX_IMAGE_PIXELS = None
    img = Image.open(image).convert("RGB")
    w, h = img.size
    f = max(1, round(max(w, h) / 2048))  # detect on a thumbnail of at most ~2048 px a side
    ys, xs = np.nonzero(detect_tissue(np.asarray(img.reduce(f)), float(f), pixel_size).mask)
    top, left, right = int(ys.min()) * f, int(xs.min()) * f, int(xs.max() + 1) * f
    legend = (20, 20, 20 + w // 5, 20 + h // 8)  # x0, y0, x1, y1
    mini = img.resize((w // 4, h // 4))
    ImageDraw.Draw(mini).ellipse([w // 16, h // 16, w // 6, h // 6], outline=(0, 200, 0), width=3)
    framed = Image.new("RGB", (mini.width + 16, mini.height + 16), (255, 255, 255))
    framed.paste(mini, (8, 8))
    fx, fy = w - framed.width - 10, 10
    if not (legend[3] + 10 < top or legend[2] + 10 < left) or not (fy + framed.height + 10 < top or fx - 10 > right):
        raise SystemExit(f"{image}: no room for the inset beside the tissue")
    draw = ImageDraw.Draw(img)
    draw.rectangle(legend, fill=(255, 255, 255))
    side = (legend[3] - legend[1]) // 6
    for i, colour in enumerate([(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (160, 32, 240)]):
        y = legend[1] + side // 2 + i * side
        draw.rectangle([legend[0] + side // 2, y, legend[0] + side, y + side // 2], fill=colour)
        draw.text((legend[0] + side + 10, y), ["invasive cancer", "breast glands", "immune infiltrate",
                                                "cancer in situ", "connective tissue"][i], fill=(0, 0, 0))
    img.paste(framed, (fx, fy))
    img.save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="prepared dataset folder holding the sample")
    ap.add_argument("--run", type=Path, required=True, help="trained run folder (with its bank)")
    ap.add_argument("--sample", default="C2", help="sample to predict (default C2)")
    ap.add_argument("--image", type=Path, help="full-resolution image (default: from the sample's metadata)")
    ap.add_argument("--step-um", type=float, help="grid step (default: the model's field of view)")
    ap.add_argument(
        "--min-tissue", type=float, default=0.5, help="tissue fraction a tile needs (default 0.5)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--k", type=int, help="retrieved neighbours (default: the run's, as predict-slide)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--workdir", type=Path, help="keep predict-slide outputs here (default: a temporary folder)"
    )
    ap.add_argument("--smooth", type=float, default=DEFAULT_SMOOTH,
                    help=f"weight of the neighbouring tiles' predictions (default {DEFAULT_SMOOTH}, predict-slide's)")
    ap.add_argument("--stain-normalise", action=argparse.BooleanOptionalAction, default=None,
                    help="predict-slide's stain normalisation (default: predict-slide's default)")
    ap.add_argument("--stain-rule", choices=STAIN_RULES, default=DEFAULT_STAIN_RULE,
                    help=f"predict-slide's --stain-rule (default {DEFAULT_STAIN_RULE})")
    ap.add_argument("--add-inset", action="store_true",
                    help="paste an annotation legend and a framed miniature of the slide onto a copy of the image")
    ap.add_argument("--keep-all-objects", action="store_true", help="predict-slide's --keep-all-objects")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = ap.parse_args()

    ds = PreparedDataset(args.data)
    meta = ds.metadata(args.sample)
    pixel_size = float(meta["pixel_size_um"])
    image = args.image or Path(meta.get("source", {}).get("image") or SHARED_IMAGES / f"{args.sample}.jpg")

    source = image
    with tempfile.TemporaryDirectory() as tmp:
        if args.add_inset:
            image = with_inset(source, Path(tmp) / f"{args.sample}_inset.png", pixel_size)
        out_dir = args.workdir or Path(tmp) / "slide"
        t0 = time.perf_counter()
        result = predict_slide(
            args.run,
            image,
            out_dir,
            pixel_size_um=pixel_size,
            step_um=args.step_um,
            sample_id=args.sample,
            min_tissue=args.min_tissue,
            batch_size=args.batch_size,
            precision=args.precision,
            device=args.device,
            progress=True,
            smooth=args.smooth,
            stain_normalise=args.stain_normalise,
            stain_rule=args.stain_rule,
            k=args.k,
            **({"tissue": TissueConfig(drop_non_tissue=False)} if args.keep_all_objects else {}),
        )
        seconds = time.perf_counter() - t0
    pred = result.adata
    info = pred.uns["cmrcnet"]
    genes = list(pred.var_names)

    counts = ds.read_counts(args.sample)
    spots = np.asarray(counts.obsm["spatial"], dtype=np.float64)[:, :2]
    tile = match_points(pred.obsm["spatial"], spots, float(info["fov_px"]) / 2.0)
    ok = tile >= 0
    measured, missing = expression_matrix(
        counts, genes, target_sum=float(info["target_sum"]), allow_missing=True, source=args.sample
    )
    measured = measured[ok]
    predicted = np.asarray(pred.X)[tile[ok]]
    col = {g: i for i, g in enumerate(genes)}

    markers = [g for g in dict.fromkeys(["ERBB2", *BREAST_CANCER_MARKERS]) if g in col and g not in missing]
    per_gene = {g: pearson(predicted[:, col[g]], measured[:, col[g]]) for g in markers}
    all_pcc = [pearson(predicted[:, j], measured[:, j]) for j in range(len(genes)) if genes[j] not in missing]
    all_pcc = [p for p in all_pcc if p is not None]
    tumour_markers = [g for g in BREAST_TUMOUR_MARKERS if g in col and g not in missing]
    score_pcc = None
    if tumour_markers:
        pred_score, _ = tumour_score(predicted, genes, tumour_markers)
        meas_score, _ = tumour_score(measured, genes, tumour_markers)
        score_pcc = pearson(pred_score, meas_score)
    usable = [p for p in per_gene.values() if p is not None]
    report = {
        "benchmark": "her2st_slide",
        "machine": machine_info(),
        "git_commit": git_commit(),
        "command": "python " + shlex.join(["benchmarks/her2st_slide.py", *sys.argv[1:]]),
        "sample": args.sample,
        "image": str(source),
        "run": str(args.run),
        "train_samples": list(info["train_samples"]),
        "bank_samples": list(info["bank_samples"]),
        "pixel_size_um": pixel_size,
        "fov_um": float(info["fov_um"]),
        "step_um": float(info["step_um"]),
        "smoothing_weight": float(info["smoothing_weight"]),
        "k": int(info["k"]),
        "stain_normalisation": info.get("stain_normalisation", "none"),
        "inset_added": bool(args.add_inset),
        "tissue_left_out": info["tissue"].get("left_out", ""),
        "level": int(info["level"]),
        "seconds_total": round(seconds, 2),
        **{
            k: result.stats[k]
            for k in ("n_grid_tiles", "n_tissue_tiles", "seconds_predict", "tiles_per_second")
        },
        "n_spots": len(spots),
        "n_spots_matched": int(ok.sum()),
        "pcc_markers": per_gene,
        "pcc_markers_mean": float(np.mean(usable)) if usable else None,
        "pcc_all_genes_mean": float(np.mean(all_pcc)) if all_pcc else None,
        "n_genes_correlated": len(all_pcc),
        "tumour_markers": tumour_markers,
        "pcc_tumour_score": score_pcc,
    }
    write_json(args.out, report)
    print(
        f"{args.sample}: {report['n_tissue_tiles']} tiles in {seconds:.1f} s ({report['tiles_per_second']} tiles/s); "
        f"{report['n_spots_matched']}/{report['n_spots']} spots matched; ERBB2 PCC {per_gene.get('ERBB2')}; "
        f"marker mean PCC {report['pcc_markers_mean']}; tumour score PCC {score_pcc} -> {args.out}"
    )


if __name__ == "__main__":
    main()
