"""The commands predict-slide, predict-slides and localise-eval: their arguments and the API calls they make."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cmrcnet.cli._common import (
    _add_k,
    _add_precision,
    _add_smooth,
    _add_stain,
    _id_list,
    _positive_float,
    _positive_int,
)

# --- predict-slide and predict-slides ----------------------------------------------------------------------
SLIDE_OUTPUTS = (
    "prediction.h5ad, tissue_mask.png, thumbnail.png, heatmap_<gene>.png, tumour_score.png (tumour_mask.png with "
    "--threshold), confidence.png (retrieval similarity per tile), tiles.geojson (QuPath: File > Import objects), "
    "summary.json (with a warning when most tiles look unlike the training sections) and report.html"
)


def _add_slide_options(p: argparse.ArgumentParser, *, pixel_size_help: str) -> None:
    """The prediction options shared by predict-slide and predict-slides."""
    p.add_argument("--model", type=Path, required=True, help="run folder of a trained model")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--pixel-size", type=_positive_float, help=pixel_size_help)
    p.add_argument(
        "--step-um",
        type=_positive_float,
        help="grid step in um (default: the model's field of view; smaller overlaps tiles for smoother maps)",
    )
    p.add_argument(
        "--genes", type=_id_list, help="comma-separated genes to draw heatmaps of (default: markers)"
    )
    p.add_argument(
        "--markers",
        help="tumour-score marker genes: comma-separated or a file (default: breast tumour markers)",
    )
    p.add_argument("--threshold", type=float, help="tumour score at or above which a tile is called tumour")
    p.add_argument(
        "--min-tissue", type=float, default=0.5, help="fraction of a tile that must be tissue (default 0.5)"
    )
    p.add_argument(
        "--keep-all-objects",
        action="store_true",
        help="keep objects that look like a legend, an inset, a label or pen ink as tissue (default: left out, "
        "with a warning)",
    )
    _add_k(p)
    p.add_argument("--batch-size", type=_positive_int, default=64, help="tiles per forward pass (default 64)")
    _add_stain(p)
    _add_smooth(p, "tile")
    _add_precision(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    from cmrcnet.data.slide_reader import READERS

    p.add_argument("--reader", choices=READERS, default="auto", help="slide back end")


def _slide_options(args: argparse.Namespace) -> dict:
    from cmrcnet.data.markers import parse_markers
    from cmrcnet.data.tissue import TissueConfig

    # `tissue` only when asked: a predict-slides batch made before the option existed keeps its fingerprints
    tissue = {"tissue": TissueConfig(drop_non_tissue=False)} if args.keep_all_objects else {}
    return dict(
        **tissue,
        step_um=args.step_um,
        genes=args.genes,
        markers=parse_markers(args.markers),
        threshold=args.threshold,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        k=args.k,
        min_tissue=args.min_tissue,
        reader=args.reader,
        stain_normalise=args.stain_normalise,
        stain_rule=args.stain_rule,  # always fingerprinted: slides done under the earlier default rule are redone
        smooth=args.smooth,
    )


def _add_predict_slide(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "predict-slide",
        parents=[common],
        help="predict expression over a whole slide (tiles x genes, heatmaps, tumour score)",
        description="Detect tissue on a thumbnail, lay a regular grid of tiles of the model's field of view over "
        "the slide and predict every tissue tile, streaming tiles from the pyramid level nearest the resolution "
        f"the model needs (memory does not grow with the slide). Writes OUT_DIR/{SLIDE_OUTPUTS}. "
        'Vendor WSI formats (svs, ndpi, mrxs, ...) need OpenSlide: pip install "cmrcnet[slide]".',
    )
    p.add_argument("--slide", type=Path, required=True, help="WSI, OME/plain TIFF, JPEG or PNG")
    _add_slide_options(
        p,
        pixel_size_help="micrometres per full-resolution pixel (default: the slide's metadata; required without)",
    )
    p.add_argument(
        "--sample-id", help="slide id (default: the file name); bank spots of this id are excluded"
    )
    p.set_defaults(handler=_run_predict_slide)


def _run_predict_slide(args: argparse.Namespace) -> int:
    from cmrcnet import api
    from cmrcnet.inference.slide import SUMMARY_FILE

    adata = api.predict_slide(
        args.model,
        args.slide,
        args.out,
        pixel_size_um=args.pixel_size,
        sample_id=args.sample_id,
        progress=not args.quiet,
        **_slide_options(args),
    )
    s = json.loads((args.out / SUMMARY_FILE).read_text(encoding="utf-8"))
    print(
        f"predicted {s['n_tissue_tiles']} tissue tiles (of {s['n_grid_tiles']}) x {adata.n_vars} genes "
        f"at level {s['level']} (downsample {s['level_downsample']:.2f}), {s['tiles_per_second']} tiles/s "
        f"-> {args.out}"
    )
    return 0


def _add_predict_slides(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "predict-slides",
        parents=[common],
        help="predict many slides from a manifest (resumable; --shard K/N and torchrun split it)",
        description="Predict every slide listed in a manifest CSV (header; columns slide, optional pixel_size "
        f"and sample_id) into OUT/<sample_id>/ ({SLIDE_OUTPUTS}), each folder written whole or not at all. A "
        "rerun skips slides whose slide content, model and options are unchanged. A broken slide is recorded "
        "and skipped; the exit code is 0, or 100 + the number of failed slides. OUT/summary.csv and "
        "summary.json list every slide. Row i belongs to shard i mod N: --shard K/N for job arrays, and under "
        "torchrun each process takes its RANK's share.",
    )
    p.add_argument(
        "--manifest", type=Path, required=True, help="CSV with columns slide[,pixel_size][,sample_id]"
    )
    _add_slide_options(
        p, pixel_size_help="micrometres per pixel for rows without pixel_size (default: the slide's metadata)"
    )
    p.add_argument("--shard", help="K/N: predict only rows i with i mod N == K (0 <= K < N)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG maps (predictions and GeoJSON only)")
    p.set_defaults(handler=_run_predict_slides)


def _run_predict_slides(args: argparse.Namespace) -> int:
    from cmrcnet.inference.batch import predict_slides

    result = predict_slides(
        args.manifest,
        args.model,
        args.out,
        shard=args.shard,
        progress=not args.quiet,
        pixel_size_um=args.pixel_size,
        plots=not args.no_plots,
        **_slide_options(args),
    )
    counts = {s: sum(r["status"] == s for r in result.rows) for s in ("done", "skipped", "failed")}
    print(
        f"{len(result.rows)} slides: {counts['done']} predicted, {counts['skipped']} already done, "
        f"{counts['failed']} failed -> {result.out_dir} (summary.csv)"
    )
    for r in result.rows:
        if r["status"] == "failed":
            print(f"failed: {r['sample_id']}: {r['error']}", file=sys.stderr)
    return result.exit_code


# --- localise-eval ----------------------------------------------------------------------------------------
LOCALISE_CONVENTIONS = """\
Match each label point to the nearest predicted tile/spot centre, then report how well the score separates
the positive labels from the rest: AUROC (ties counted half) and average precision.

labels (TSV): x, y in full-resolution pixels of the predicted image, label, optional sample_id;
  her2st's pixel_x, pixel_y are used when present. Rows without coordinates or label are dropped.
  Labels compare exactly (case-sensitive) after stripping spaces.
  positive: the --positive labels (e.g. "invasive cancer" "cancer in situ").
  ignored:  the --ignore labels (none by default, e.g. undetermined), left out before matching.
  negative: every other label.
matching: the nearest centre in Chebyshev distance (max |dx|, |dy|), if at most half the tile side
  (predict-slide output: the tile containing the point), half the median spot spacing (spot
  predictions) or --max-distance px. Points farther from every centre are unmatched and left out
  (counted). With a sample_id column a point matches only its own sample; two points in one tile
  both count, with that tile's score.
"""


def _add_localise_eval(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "localise-eval",
        parents=[common],
        help="AUROC / average precision of a tumour score against pathologist labels",
        description=LOCALISE_CONVENTIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", type=Path, required=True, help="prediction .h5ad (predict-slide or predict)")
    p.add_argument("--labels", type=Path, required=True, help="label TSV with columns x, y, label")
    p.add_argument("--positive", nargs="+", required=True, help="label(s) counted as positive (tumour)")
    p.add_argument(
        "--ignore",
        nargs="+",
        default=[],
        help="label(s) left out, e.g. undetermined (default: none; all rank)",
    )
    p.add_argument(
        "--score-key", default="tumour_score", help="obs column or gene to rank by (default tumour_score)"
    )
    p.add_argument("--markers", help="markers for a tumour score computed here when --pred has none")
    p.add_argument(
        "--max-distance", type=_positive_float, help="matching distance in px (default: half a tile)"
    )
    p.add_argument("--out", type=Path, help="also write the report to this JSON file")
    p.set_defaults(handler=_run_localise_eval)


def _run_localise_eval(args: argparse.Namespace) -> int:
    from cmrcnet.data.markers import parse_markers
    from cmrcnet.evaluation.localisation import localise_eval

    r = localise_eval(
        args.pred,
        args.labels,
        args.positive,
        score_key=args.score_key,
        markers=parse_markers(args.markers),
        max_distance_px=args.max_distance,
        out_path=args.out,
        ignore=args.ignore,
    )
    print(
        f"{r['score']}: AUROC {r['auroc']:.3f}, average precision {r['average_precision']:.3f} "
        f"(prevalence {r['prevalence']:.3f}); {r['n_positive']} positive / {r['n_negative']} negative label "
        f"points matched, {r['n_unmatched']} unmatched"
    )
    return 0
