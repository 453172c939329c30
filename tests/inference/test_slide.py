"""Whole-slide prediction on generated slides: readers, tissue detection, tile grid, outputs and user errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import tifffile
from PIL import Image

from cmrcnet.cli import main
from cmrcnet.data.image import SlideImage
from cmrcnet.data.slide_reader import PillowReader, TiffReader, open_slide, read_thumbnail, read_tile
from cmrcnet.data.tissue import detect_tissue, otsu_threshold
from cmrcnet.errors import ConfigError
from cmrcnet.inference.slide import TileGrid
from cmrcnet.run.layout import K_CHOICE_FILE

UM_PER_PX = 2.0  # the synthetic slides' pixel size: the tiny run's 112 um field of view is 56 px
FOV_PX = 112.0 / UM_PER_PX
W, H = 640, 512  # slide size in pixels
DISC = (320.0, 256.0, 180.0)  # tissue disc: centre x, y and radius in pixels
SPECK = (40, 40, 6)  # a 6 x 6 px purple speck (dust) at x, y = 40: far smaller than min_object_um2


def draw_slide(width: int = W, height: int = H, *, seed: int = 0, tissue: bool = True) -> np.ndarray:
    """White glass with a textured pink/purple disc (purple towards the right) and a small dust speck."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 245, dtype=np.float32)  # (H, W, 3)
    img += rng.normal(0, 2.0, img.shape)
    if tissue:
        cx, cy, r = DISC
        yy, xx = np.mgrid[0:height, 0:width]
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        t = np.clip((xx - (cx - r)) / (2 * r), 0, 1)[..., None]  # 0 pink (left) -> 1 purple (right)
        pink, purple = np.array([235, 150, 190]), np.array([130, 70, 170])
        colour = (1 - t) * pink + t * purple + rng.normal(0, 12.0, img.shape)
        img = np.where(inside[..., None], colour, img)
        x, y, s = SPECK
        img[y : y + s, x : x + s] = purple
    return np.clip(img, 0, 255).astype(np.uint8)


def write_pyramid(
    path: Path, img: np.ndarray, *, um_per_px: float | None = UM_PER_PX, levels: int = 3
) -> None:
    """Tiled pyramidal TIFF (SubIFDs, 2x steps) with the pixel size in the resolution tags."""
    res = {} if um_per_px is None else {"resolution": (1e4 / um_per_px,) * 2, "resolutionunit": "CENTIMETER"}
    opts = dict(tile=(128, 128), photometric="rgb", compression="zlib")
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, subifds=levels - 1, **res, **opts)
        for i in range(1, levels):
            tw.write(img[:: 2**i, :: 2**i], subfiletype=1, **opts)


@pytest.fixture(scope="module")
def slide_tif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "disc.tif"
    write_pyramid(path, draw_slide())
    return path


def _predict(run: Path, slide: Path, out: Path, *extra: str) -> int:
    return main(
        ["predict-slide", "--model", str(run), "--slide", str(slide), "--out", str(out), "--quiet", *extra]
    )


# --- readers ------------------------------------------------------------------------------------------------
def test_tiff_pyramid_levels_pixel_size_and_regions(slide_tif: Path) -> None:
    img = draw_slide()
    with open_slide(slide_tif) as r:
        assert r.kind == "tifffile"
        assert r.level_dimensions == ((W, H), (W // 2, H // 2), (W // 4, H // 4))
        np.testing.assert_allclose(r.level_downsamples, [1.0, 2.0, 4.0])
        assert r.pixel_size_um == pytest.approx(UM_PER_PX) and r.pixel_size_source == "TIFF XResolution"
        np.testing.assert_array_equal(r.read_region(0, 100, 50, 200, 150), img[50:200, 100:300])
        np.testing.assert_array_equal(r.read_region(1, 10, 20, 30, 40), img[::2, ::2][20:60, 10:40])
        edge = r.read_region(0, W - 10, -5, 20, 15)  # beyond the right and top edges: white
        np.testing.assert_array_equal(edge[5:, :10], img[:10, W - 10 :])
        assert (edge[:5] == 255).all() and (edge[:, 10:] == 255).all()
        # regions are decoded tile by tile from the TIFF segments (cached for neighbouring reads)
        assert r.access_method(0) == "segments"
        for x, y in [(0, 0), (90, 60), (250, 300), (500, 400)]:
            np.testing.assert_array_equal(r.read_region(0, x, y, 140, 100), img[y : y + 100, x : x + 140])


def test_planar_tiff_without_zarr_reads_small_levels_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = draw_slide(200, 160)
    planar = np.moveaxis(img, -1, 0)  # (3, H, W): separate colour planes, not decodable segment by segment
    path = tmp_path / "planar.tif"
    opts = dict(photometric="rgb", planarconfig="separate", compression="zlib", tile=(64, 64))
    with tifffile.TiffWriter(path) as tw:
        tw.write(planar, subifds=1, **opts)
        tw.write(planar[:, ::2, ::2], subfiletype=1, **opts)
    with TiffReader(path, use_zarr=False) as r:
        assert [r.access_method(lv) for lv in (0, 1)] == ["whole", "whole"]
        np.testing.assert_array_equal(r.read_region(0, 10, 20, 50, 40), img[20:60, 10:60])
    # a level too large to load whole is not used: the finest readable level is, with a clear error for the other
    monkeypatch.setattr("cmrcnet.data.slides.tiff_reader.MAX_WHOLE_LEVEL_BYTES", 100 * 80 * 3)
    with TiffReader(path, use_zarr=False) as r:
        assert r.readable_levels() == [1] and r.best_level_for_downsample(1.0) == 1
        with pytest.raises(ConfigError, match="pip install zarr"):
            r.read_region(0, 0, 0, 10, 10)


def test_undecodable_tiff_names_the_missing_codec(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        import imagecodecs  # noqa: F401

        pytest.skip("imagecodecs is installed: JPEG-compressed TIFFs decode")
    except ImportError:
        pass
    path = tmp_path / "jpeg.tif"
    Image.fromarray(draw_slide(200, 160)).save(path, compression="jpeg")  # JPEG strips (libtiff)
    assert _predict(run, path, tmp_path / "out", "--pixel-size", "2") == 2
    err = capsys.readouterr().err
    assert "jpeg.tif" in err and "imagecodecs" in err and "Traceback" not in err


def test_ome_tiff_and_plain_tiff(tmp_path: Path) -> None:
    img = draw_slide(200, 160)
    ome = tmp_path / "s.ome.tif"
    tifffile.imwrite(ome, img, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.25})
    with open_slide(ome) as r:
        assert r.pixel_size_um == pytest.approx(0.25) and r.pixel_size_source == "OME PhysicalSizeX"
    plain = tmp_path / "plain.tif"  # uncompressed, no resolution: memory-mapped, no pixel size
    tifffile.imwrite(plain, img, photometric="rgb")
    with open_slide(plain) as r:
        assert r.pixel_size_um is None and r.n_levels == 1 and r.access_method(0) == "memmap"
        np.testing.assert_array_equal(r.read_region(0, 5, 6, 50, 40), img[6:46, 5:55])
    dpi72 = tmp_path / "dpi72.tif"  # a writer's default 72 dpi is not a microscope resolution
    tifffile.imwrite(dpi72, img, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with open_slide(dpi72) as r:
        assert r.pixel_size_um is None


@pytest.mark.extra
def test_openslide_reader_matches_tifffile(tmp_path: Path) -> None:
    pytest.importorskip("openslide", reason='optional extra not installed: pip install -e ".[slide]"')
    img = draw_slide(300, 260)
    path = tmp_path / "chain.tif"  # levels in the main IFD chain: OpenSlide's generic-tiff layout
    with tifffile.TiffWriter(path) as tw:
        opts = dict(tile=(128, 128), photometric="rgb", compression="zlib")
        tw.write(img, resolution=(1e4 / 0.5,) * 2, resolutionunit="CENTIMETER", **opts)
        tw.write(img[::2, ::2], subfiletype=1, **opts)
    with open_slide(path, reader="openslide") as r:
        assert r.kind == "openslide" and r.n_levels == 2
        assert r.pixel_size_um == pytest.approx(0.5)
        np.testing.assert_array_equal(r.read_region(1, 5, 7, 40, 30), img[::2, ::2][7:37, 5:45])
        assert (r.read_region(0, 290, 0, 20, 5)[:, 10:] == 255).all()  # beyond the edge: white


def test_missing_openslide_tells_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svs = tmp_path / "slide.svs"
    svs.write_bytes(b"not really a slide")
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    with pytest.raises(ConfigError, match=r'pip install "cmrcnet\[slide\]"'):
        open_slide(svs)


def test_jpeg_levels_by_dct_scaling(tmp_path: Path) -> None:
    img = draw_slide(400, 300)
    path = tmp_path / "s.jpg"
    Image.fromarray(img).save(path, quality=95)
    with open_slide(path) as r:
        assert isinstance(r, PillowReader) and r.pixel_size_um is None
        assert r.level_dimensions == ((400, 300), (200, 150), (100, 75), (50, 38))
        quarter = r.read_region(2, 0, 0, 100, 75).astype(np.float32)
        box = np.asarray(Image.fromarray(img).reduce(4), dtype=np.float32)
        assert np.abs(quarter - box).mean() < 6  # JPEG-decoded at 1/4 is close to a 4x4 box average


def test_read_tile_matches_training_patches(slide_tif: Path) -> None:
    img = draw_slide()
    reference = SlideImage.from_array(img, "memory://disc.png")
    with open_slide(slide_tif) as r:
        for cx, cy in [(300.0, 250.0), (20.5, 500.25)]:
            np.testing.assert_array_equal(
                read_tile(r, 0, cx, cy, FOV_PX, 32), reference.read_patch(cx, cy, FOV_PX, 32)[0]
            )


# --- tissue and grid ----------------------------------------------------------------------------------------
def test_tissue_mask_keeps_the_disc_and_drops_dust(slide_tif: Path) -> None:
    with open_slide(slide_tif) as r:
        thumb, ds = read_thumbnail(r, 4.0)
    assert ds == pytest.approx(4.0) and thumb.shape == (H // 4, W // 4, 3)
    mask = detect_tissue(thumb, ds, UM_PER_PX)
    cx, cy, rad = (v / ds for v in DISC)
    yy, xx = np.mgrid[0 : thumb.shape[0], 0 : thumb.shape[1]]
    d = np.hypot(xx + 0.5 - cx, yy + 0.5 - cy)
    assert mask.mask[d < rad - 2].mean() > 0.99 and not mask.mask[d > rad + 2].any()  # speck removed
    white = detect_tissue(np.full((64, 64, 3), 240, np.uint8), 4.0, UM_PER_PX)
    assert not white.mask.any()


def test_otsu_splits_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 500), rng.normal(0.6, 0.05, 300)]).clip(0, 1)
    assert 0.2 < otsu_threshold(values) < 0.5


def test_grid_covers_the_slide() -> None:
    g = TileGrid.over(640, 512, 56.0, 56.0)
    assert (g.n_rows, g.n_cols) == (10, 12)  # ceil((512 - 56) / 56) + 1, ceil((640 - 56) / 56) + 1
    rows, cols = g.positions()
    c = g.centers(rows, cols)
    assert c[0].tolist() == [28.0, 28.0] and c[-1].tolist() == [28.0 + 11 * 56, 28.0 + 9 * 56]
    assert TileGrid.over(100, 100, 200.0, 50.0).n_rows == 1  # a slide smaller than a tile: one tile


# --- predict-slide ------------------------------------------------------------------------------------------
def test_predict_slide_on_pyramidal_tiff(run: Path, slide_tif: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _predict(run, slide_tif, out, "--threshold", "0.0", "--batch-size", "16") == 0
    a = ad.read_h5ad(out / "prediction.h5ad")
    info = a.uns["cmrcnet"]
    assert (
        info["pixel_size_um"] == pytest.approx(UM_PER_PX) and info["pixel_size_source"] == "TIFF XResolution"
    )
    assert info["fov_px"] == pytest.approx(FOV_PX) and info["step_px"] == pytest.approx(FOV_PX)
    assert (
        info["level"] == 0
    )  # 56 px tiles for a 32 px model input: level 1 (28 px) would have to be enlarged
    assert info["k"] == json.loads((run / K_CHOICE_FILE).read_text())["k"]  # the k train chose for the bank
    xy = a.obsm["spatial"]
    # centres on the grid: fov/2 + k * step in full-resolution pixels
    k = (xy - FOV_PX / 2) / FOV_PX
    np.testing.assert_allclose(k, np.round(k), atol=1e-9)
    np.testing.assert_array_equal(np.round(k).astype(int), a.obs[["grid_col", "grid_row"]].to_numpy())
    # only tissue tiles: inside the disc (at least half of each tile is tissue); every tile well inside is kept
    d = np.hypot(xy[:, 0] - DISC[0], xy[:, 1] - DISC[1])
    assert (d < DISC[2] + FOV_PX / 4).all()
    g = TileGrid.over(W, H, FOV_PX, FOV_PX)
    all_xy = g.centers(*g.positions())
    inner = np.hypot(all_xy[:, 0] - DISC[0], all_xy[:, 1] - DISC[1]) + FOV_PX / np.sqrt(2) < DISC[2]
    assert inner.sum() <= a.n_obs < g.n_rows * g.n_cols
    assert {tuple(p) for p in all_xy[inner]} <= {tuple(p) for p in xy}
    assert np.isfinite(a.X).all() and a.n_vars == 30
    # tumour score from the synthetic tumour markers, thresholded
    assert list(info["tumour_markers"]) == ["SYN_TUMOR1", "SYN_TUMOR2", "SYN_TUMOR3"]
    score = a.obs["tumour_score"].to_numpy()
    assert np.isfinite(score).all() and abs(score.mean()) < 1e-6
    np.testing.assert_array_equal(a.obs["tumour"].to_numpy(), score >= 0.0)
    names = {p.name for p in out.iterdir()}
    expected = {"prediction.h5ad", "tissue_mask.png", "thumbnail.png", "tumour_score.png", "tumour_mask.png"}
    assert expected <= names and "summary.json" in names
    heatmaps = sorted(n for n in names if n.startswith("heatmap_"))
    assert len(heatmaps) == 8  # the synthetic markers the model predicts (at most 8 by default)
    assert not [n for n in names if n.startswith(".")]  # no temporary files left
    with Image.open(out / "tissue_mask.png") as m:
        assert m.mode == "L" and set(np.unique(np.asarray(m)).tolist()) == {0, 255}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_tissue_tiles"] == a.n_obs and summary["tiles_per_second"] > 0


def test_overlapping_tiles_with_a_smaller_step(run: Path, slide_tif: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        _predict(run, slide_tif, out, "--step-um", "56", "--genes", "SYN_TUMOR1", "--markers", "SYN_TUMOR1")
        == 0
    )
    a = ad.read_h5ad(out / "prediction.h5ad")
    step = FOV_PX / 2
    assert a.uns["cmrcnet"]["step_px"] == pytest.approx(step)
    k = (a.obsm["spatial"] - FOV_PX / 2) / step
    np.testing.assert_allclose(k, np.round(k), atol=1e-9)
    assert a.n_obs > 3 * 30  # about 4x the tiles of the side-by-side grid
    assert [p.name for p in out.glob("heatmap_*.png")] == ["heatmap_SYN_TUMOR1.png"]


def test_jpeg_and_png_need_pixel_size(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = draw_slide()
    jpg, png = tmp_path / "disc.jpg", tmp_path / "disc.png"
    Image.fromarray(img).save(jpg, quality=92)
    Image.fromarray(img).save(png)
    assert _predict(run, jpg, tmp_path / "nopx") == 2
    err = capsys.readouterr().err
    assert "disc.jpg" in err and "--pixel-size" in err and "Traceback" not in err
    assert not (tmp_path / "nopx" / "prediction.h5ad").exists()
    for path in (jpg, png):
        out = tmp_path / path.suffix[1:]
        assert _predict(run, path, out, "--pixel-size", str(UM_PER_PX)) == 0
        a = ad.read_h5ad(out / "prediction.h5ad")
        assert a.uns["cmrcnet"]["pixel_size_source"] == "user" and a.uns["cmrcnet"]["reader"] == "pillow"
        d = np.hypot(a.obsm["spatial"][:, 0] - DISC[0], a.obsm["spatial"][:, 1] - DISC[1])
        assert a.n_obs > 20 and (d < DISC[2] + FOV_PX / 4).all()


def test_all_background_slide_is_a_clear_error(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "glass.tif"
    write_pyramid(path, draw_slide(tissue=False))
    assert _predict(run, path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "glass.tif" in err and "no tissue" in err
    assert not (tmp_path / "out" / "prediction.h5ad").exists()


def test_unknown_heatmap_gene_is_refused(run: Path, slide_tif: Path, tmp_path: Path, capsys) -> None:
    assert _predict(run, slide_tif, tmp_path / "out", "--genes", "NOTAGENE") == 2
    assert "NOTAGENE" in capsys.readouterr().err


def test_stain_normalise_maps_a_recoloured_slide_back(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--stain-normalise: a slide in another stain balance on a black background is mapped onto the training
    patches' colours before prediction; recorded in provenance. --no-stain-normalise turns it off; no flag gives
    DEFAULT_STAIN_NORMALISE. A run without a stain reference: the default predicts without it (with a log
    line), an explicit --stain-normalise is a clear error."""
    from cmrcnet.constants import DEFAULT_STAIN_NORMALISE

    img = draw_slide().astype(np.float64)
    od = -np.log(np.clip(img / 255.0, 1 / 255, 1.0)) * np.array([1.4, 0.7, 1.2])  # another stain balance
    img = np.exp(-od) * 255.0
    img[np.all(draw_slide() >= 230, axis=2)] = 3.0  # black background instead of white glass
    path = tmp_path / "recoloured.tif"
    write_pyramid(path, np.clip(img, 0, 255).astype(np.uint8))
    plain, normed, default = tmp_path / "plain", tmp_path / "normed", tmp_path / "default"
    assert _predict(run, path, plain, "--no-stain-normalise") == 0
    assert _predict(run, path, normed, "--stain-normalise") == 0
    assert _predict(run, path, default) == 0
    assert _predict(run, path, tmp_path / "reinhard", "--stain-normalise", "--stain-rule", "reinhard") == 0
    a, b = ad.read_h5ad(plain / "prediction.h5ad"), ad.read_h5ad(normed / "prediction.h5ad")
    r = ad.read_h5ad(tmp_path / "reinhard" / "prediction.h5ad")
    assert a.uns["cmrcnet"]["stain_normalisation"] == "none"
    # the default rule; the recolouring is a cast (far above COLOUR_CAST), so it is corrected
    assert b.uns["cmrcnet"]["stain_normalisation"].startswith("rule 'contrast'")
    assert "colour cast" in b.uns["cmrcnet"]["stain_normalisation"]
    assert "corrected" in b.uns["cmrcnet"]["stain_normalisation"]
    assert r.uns["cmrcnet"]["stain_normalisation"].startswith("rule 'reinhard'")
    assert a.n_obs == b.n_obs == r.n_obs and not np.allclose(a.X, b.X) and not np.allclose(b.X, r.X)
    c = ad.read_h5ad(default / "prediction.h5ad")
    np.testing.assert_array_equal(c.X, (b if DEFAULT_STAIN_NORMALISE else a).X)
    # a run made before stain references existed
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    (old / "stain_reference.json").unlink()
    assert _predict(old, path, tmp_path / "x", "--stain-normalise") == 2
    capsys.readouterr()
    assert _predict(old, path, tmp_path / "y") == 0
    assert ad.read_h5ad(tmp_path / "y" / "prediction.h5ad").uns["cmrcnet"]["stain_normalisation"] == "none"
    if DEFAULT_STAIN_NORMALISE:
        err = capsys.readouterr().err
        assert "no stain reference" in err and "without stain normalisation" in err


def test_a_slide_at_another_resolution_is_read_at_the_training_field_of_view_with_a_warning(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cmrcnet.inference.slide import training_pixel_size
    from cmrcnet.run.load import load_trained_model

    train_um = training_pixel_size(load_trained_model(run))
    assert train_um is not None and json.loads((run / "run.json").read_text())["pixel_size_um"]
    png = tmp_path / "disc.png"
    Image.fromarray(draw_slide()).save(png)
    same = train_um  # the drawing at the training resolution: no warning
    assert _predict(run, png, tmp_path / "same", "--pixel-size", str(same)) == 0
    assert json.loads((tmp_path / "same" / "summary.json").read_text())["warnings"] == []
    capsys.readouterr()
    assert _predict(run, png, tmp_path / "coarse", "--pixel-size", str(3 * train_um)) == 0
    warnings = json.loads((tmp_path / "coarse" / "summary.json").read_text())["warnings"]
    assert len(warnings) >= 1 and "3.0x coarser than the training sections" in warnings[0]
    assert "resized to the training patches'" in warnings[0] and "3.0x coarser" in capsys.readouterr().err
    a = ad.read_h5ad(tmp_path / "coarse" / "prediction.h5ad")
    assert a.uns["cmrcnet"]["fov_px"] == pytest.approx(112.0 / (3 * train_um))  # the same 112 um of tissue


def test_tile_predictions_are_smoothed_by_default(run: Path, slide_tif: Path, tmp_path: Path) -> None:
    from cmrcnet.inference.smoothing import smooth_neighbours

    assert _predict(run, slide_tif, tmp_path / "plain", "--smooth", "0") == 0
    assert _predict(run, slide_tif, tmp_path / "default") == 0
    plain, smooth = (ad.read_h5ad(tmp_path / d / "prediction.h5ad") for d in ("plain", "default"))
    assert plain.uns["cmrcnet"]["smoothing_weight"] == 0.0 and smooth.uns["cmrcnet"]["smoothing_weight"] == 0.5
    expected = smooth_neighbours(np.asarray(plain.X), plain.obsm["spatial"], weight=0.5)
    np.testing.assert_allclose(np.asarray(smooth.X), expected, rtol=1e-4, atol=1e-5)
    assert _predict(run, slide_tif, tmp_path / "bad", "--smooth", "1.5") == 2


def _pale_on_black() -> np.ndarray:
    """A pale lavender disc (low saturation) with a small strongly stained blue region, on a black background
    with JPEG-like noise: on this, Otsu on saturation splits the blue region from everything else."""
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(4, 3, (H, W, 3)), 0, 255)  # black background
    cx, cy, r = DISC
    yy, xx = np.mgrid[0:H, 0:W]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    pale = np.array([205, 190, 215]) + rng.normal(0, 8, (H, W, 3))
    img = np.where(inside[..., None], pale, img)
    blue = inside & (xx < cx - r / 2)
    img = np.where(blue[..., None], np.array([60, 110, 160]) + rng.normal(0, 8, (H, W, 3)), img)
    return np.clip(img, 0, 255).astype(np.uint8), inside


def test_tissue_on_a_black_background_is_found_by_brightness() -> None:
    img, inside = _pale_on_black()
    mask = detect_tissue(img, 1.0, UM_PER_PX)
    assert mask.feature == "brightness"
    assert mask.mask[inside].mean() > 0.97 and mask.mask[~inside].mean() < 0.01
    white = detect_tissue(draw_slide(), 1.0, UM_PER_PX)
    assert white.feature == "saturation"  # white glass: saturation, as before


def test_black_background_pixels_are_made_white_and_tissue_is_untouched() -> None:
    from cmrcnet.data.stain import whiten_black

    img, inside = _pale_on_black()
    out = whiten_black(img[None])[0]
    assert (out[~inside] == 255).mean() > 0.99
    np.testing.assert_array_equal(out[inside], img[inside])


def test_predict_slide_on_a_black_background(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img, _ = _pale_on_black()
    png = tmp_path / "black.png"
    Image.fromarray(img).save(png)
    assert _predict(run, png, tmp_path / "out", "--pixel-size", str(UM_PER_PX)) == 0
    assert "black background" in capsys.readouterr().err
    a = ad.read_h5ad(tmp_path / "out" / "prediction.h5ad")
    assert a.uns["cmrcnet"]["black_background"] and a.uns["cmrcnet"]["tissue"]["feature"] == "brightness"
    g = TileGrid.over(W, H, FOV_PX, FOV_PX)
    xy = g.centers(*g.positions())
    inner = np.hypot(xy[:, 0] - DISC[0], xy[:, 1] - DISC[1]) + FOV_PX / np.sqrt(2) < DISC[2]
    assert a.n_obs >= inner.sum()  # the whole disc, not only its blue part
