"""`cmrcnet predict-slides`: manifests, failures that never stop a batch, resuming, shards, torchrun, GeoJSON."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from cmrcnet.cli import main
from cmrcnet.errors import InputFileError
from cmrcnet.inference.batch import read_manifest
from cmrcnet.inference.export import GEOJSON_FILE

from test_slide import UM_PER_PX, draw_slide, write_pyramid

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three good slides (TIFF with metadata, two PNGs without), a missing one and a broken one, in a manifest."""
    root = tmp_path_factory.mktemp("batch_slides")
    write_pyramid(root / "a.tif", draw_slide(seed=1))
    Image.fromarray(draw_slide(seed=2)).save(root / "b.png")
    Image.fromarray(draw_slide(seed=3)).save(root / "c.png")
    (root / "broken.png").write_bytes(b"not a png at all")
    rows = [
        ("a.tif", "", ""),
        ("b.png", str(UM_PER_PX), "slideB"),
        ("missing.tif", "", ""),
        ("broken.png", str(UM_PER_PX), ""),
        (str(root / "c.png"), str(UM_PER_PX), "slideC"),
    ]
    with open(root / "slides.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "pixel_size", "sample_id"])
        writer.writerows(rows)
    return root


def _batch(run: Path, manifest: Path, out: Path, *extra: str) -> int:
    argv = ["predict-slides", "--manifest", str(manifest), "--model", str(run), "--out", str(out), "--quiet"]
    return main([*argv, "--no-plots", *extra])


def _summary(out: Path) -> dict[str, str]:
    with open(out / "summary.csv", newline="") as fh:
        return {r["sample_id"]: r["status"] for r in csv.DictReader(fh)}


def test_a_broken_slide_never_stops_the_batch_and_a_rerun_skips_what_is_done(
    run: Path, slides: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert _batch(run, slides / "slides.csv", out) == 100 + 2  # 2 failed slides
    status = _summary(out)
    assert status == {
        "a": "done",
        "slideB": "done",
        "missing": "failed",
        "broken": "failed",
        "slideC": "done",
    }
    err = capsys.readouterr().err
    assert "failed: missing:" in err and "slide not found" in err and "failed: broken:" in err
    failed = json.loads((out / "broken.failed.json").read_text())
    assert "broken.png" in failed["error"]
    for sid in ("a", "slideB", "slideC"):
        names = {p.name for p in (out / sid).iterdir()}
        assert {"prediction.h5ad", GEOJSON_FILE, "done.json", "summary.json"} <= names
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_slides"], summary["done"], summary["failed"], summary["pending"]) == (5, 3, 2, 0)

    before = {sid: (out / sid / "prediction.h5ad").stat().st_mtime_ns for sid in ("a", "slideB", "slideC")}
    assert _batch(run, slides / "slides.csv", out) == 102
    assert "3 already done" in capsys.readouterr().out
    assert before == {sid: (out / sid / "prediction.h5ad").stat().st_mtime_ns for sid in before}

    # a changed slide (same name, other content) is predicted again; the others are still skipped
    Image.fromarray(draw_slide(seed=9)).save(slides / "c.png")
    try:
        assert _batch(run, slides / "slides.csv", out) == 102
        assert "1 predicted, 2 already done" in capsys.readouterr().out
        assert (out / "slideC" / "prediction.h5ad").stat().st_mtime_ns != before["slideC"]
    finally:
        Image.fromarray(draw_slide(seed=3)).save(slides / "c.png")


def _predictions(out: Path) -> dict[str, np.ndarray]:
    return {p.parent.name: np.asarray(ad.read_h5ad(p).X) for p in sorted(out.glob("*/prediction.h5ad"))}


def test_shards_split_the_manifest_and_give_the_same_predictions(
    run: Path, slides: Path, tmp_path: Path
) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _batch(run, slides / "slides.csv", whole)
    _batch(run, slides / "slides.csv", parts, "--shard", "0/2")
    assert set(_summary(parts).values()) == {"done", "failed", "pending"}  # shard 1's rows are still pending
    assert sorted(_predictions(parts)) == ["a", "slideC"]  # rows 0, 2 (missing) and 4
    _batch(run, slides / "slides.csv", parts, "--shard", "1/2")
    assert _summary(parts) == _summary(whole)
    one, two = _predictions(whole), _predictions(parts)
    assert sorted(one) == sorted(two) == ["a", "slideB", "slideC"]
    for sid in one:
        np.testing.assert_array_equal(one[sid], two[sid])


@pytest.mark.slow
def test_two_torchrun_processes_give_the_same_predictions_as_one(
    run: Path, slides: Path, tmp_path: Path
) -> None:
    """Both in subprocesses on one thread each: the same per-process numerics, so tile predictions (and the
    retrieved neighbours) must be identical, not just close."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    args = ["predict-slides", "--manifest", str(slides / "slides.csv"), "--model", str(run), "--quiet", "--no-plots"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    alone = subprocess.run([sys.executable, "-m", "cmrcnet", *args, "--out", str(single)],
                           env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert alone.returncode != 0  # the broken slides
    done = subprocess.run([*torchrun, "-m", "cmrcnet", *args, "--out", str(multi)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0  # each process had a failed slide: rows 2 and 3 fall into different shards
    assert _summary(multi) == _summary(single)
    one, two = _predictions(single), _predictions(multi)
    assert sorted(one) == sorted(two)
    for sid in one:
        np.testing.assert_array_equal(one[sid], two[sid])


def test_geojson_round_trips_with_tile_coordinates(run: Path, slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _batch(run, slides / "slides.csv", out)
    pred = ad.read_h5ad(out / "a" / "prediction.h5ad")
    info = pred.uns["cmrcnet"]
    collection = json.loads((out / "a" / GEOJSON_FILE).read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == pred.n_obs
    side = float(info["fov_px"])
    for i, feature in enumerate(collection["features"]):
        ring = np.array(feature["geometry"]["coordinates"][0])  # (5, 2) closed square, x then y
        assert feature["properties"]["objectType"] == "tile" and np.array_equal(ring[0], ring[-1])
        np.testing.assert_allclose(ring[:4].mean(axis=0), pred.obsm["spatial"][i], atol=0.01)
        np.testing.assert_allclose(np.ptp(ring, axis=0), [side, side], atol=0.02)
        measures = feature["properties"]["measurements"]
        np.testing.assert_allclose([measures[g] for g in pred.var_names], pred.X[i], atol=1e-5)
        if "tumour_score" in pred.obs:
            assert measures["tumour_score"] == pytest.approx(pred.obs["tumour_score"].iloc[i], abs=1e-5)
    # inside the slide: every tile centre lies within the image
    with Image.open(slides / "a.tif") as im:
        w, h = im.size
    xy = pred.obsm["spatial"]
    assert (xy[:, 0] > 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] > 0).all() and (xy[:, 1] < h).all()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("path,pixel_size\na.tif,0.5\n", "needs a header with a 'slide' column"),
        ("slide,pixel_size\na.tif,-1\n", "row 2: pixel_size must be a positive number"),
        ("slide,sample_id\na.tif,x\nb.png,x\n", "rows 2 and 3 have the same sample_id 'x'"),
        ("slide\n", "lists no slides"),
    ],
)
def test_bad_manifests_exit_2_naming_the_file(tmp_path: Path, capsys, text: str, problem: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    rc = main(
        [
            "predict-slides",
            "--manifest",
            str(manifest),
            "--model",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(manifest) in err and problem in err and len(err.splitlines()) == 1
    with pytest.raises(InputFileError, match=re.escape(problem)):
        read_manifest(manifest)
    assert not (tmp_path / "o").exists()


def test_bad_shard_is_a_one_line_error(run: Path, slides: Path, tmp_path: Path, capsys) -> None:
    assert _batch(run, slides / "slides.csv", tmp_path / "o", "--shard", "2/2") == 2
    assert "shard must be K/N with 0 <= K < N" in capsys.readouterr().err


def test_slide_warnings_reach_the_batch_summary_and_index(run: Path, slides: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "coarse.csv"
    manifest.write_text(f"slide,pixel_size,sample_id\n{slides / 'b.png'},{4 * UM_PER_PX},coarse\n")
    out = tmp_path / "out"
    assert main(["predict-slides", "--manifest", str(manifest), "--model", str(run), "--out", str(out),
                 "--quiet"]) == 0
    (row,) = json.loads((out / "summary.json").read_text())["slides"]
    assert row["status"] == "done" and any("coarser than the training sections" in w for w in row["warnings"])
    with open(out / "summary.csv", newline="") as fh:
        assert "coarser than the training sections" in next(csv.DictReader(fh))["warnings"]
    assert "Warning: the slide is" in (out / "index.html").read_text()
