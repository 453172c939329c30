"""Objects that pass the tissue threshold but are not tissue: annotation legends, framed insets, marker-pen ink."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from cmrcnet.data.tissue import TissueConfig, detect_tissue, hue_degrees, off_stain

from test_slide import DISC, FOV_PX, UM_PER_PX, _pale_on_black, _predict, draw_slide


def _legend(img: np.ndarray, x0: int, y0: int, w: int = 110, h: int = 90) -> np.ndarray:
    """A white legend box with coloured squares (the annotation classes) pasted at (x0, y0)."""
    out = img.copy()
    out[y0 : y0 + h, x0 : x0 + w] = 255
    for i, colour in enumerate([(255, 0, 0), (0, 200, 0), (0, 0, 255)]):
        out[y0 + 20 + 18 * i : y0 + 32 + 18 * i, x0 + 20 : x0 + 32] = colour
    return out


def _framed_miniature(img: np.ndarray, x0: int, y0: int) -> np.ndarray:
    """A 1/4-size copy of the slide in a 4 px white frame (too thin to survive as an object of its own), pasted
    at (x0, y0)."""
    mini = np.asarray(Image.fromarray(img).reduce(4))
    h, w = mini.shape[:2]
    out = img.copy()
    out[y0 : y0 + h + 8, x0 : x0 + w + 8] = 255
    out[y0 + 4 : y0 + 4 + h, x0 + 4 : x0 + 4 + w] = mini
    return out


def _box(mask: np.ndarray, x0: int, y0: int, w: int, h: int) -> float:
    return float(mask[y0 : y0 + h, x0 : x0 + w].mean())


def test_hue_and_off_stain_colours() -> None:
    colours = {  # RGB: whether it is a colour H&E does not give
        (230, 150, 200): False,  # eosin pink
        (80, 60, 150): False,  # haematoxylin purple
        (200, 60, 50): False,  # red blood cells
        (41, 78, 97): False,  # teal: haematoxylin through another scanner (the benchmark's degraded copy)
        (0, 0, 255): False,  # blue ink: not distinguishable from haematoxylin by hue, left alone
        (0, 200, 0): True,  # green pen
        (255, 200, 0): True,  # yellow
        (100, 220, 150): True,  # mint
        (200, 220, 200): False,  # pale green-grey: below the saturation floor
    }
    px = np.array([list(colours)], dtype=np.uint8)  # (1, n, 3)
    assert off_stain(px)[0].tolist() == list(colours.values())
    np.testing.assert_allclose(hue_degrees(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8))[0],
                               [0.0, 120.0, 240.0])


def test_a_legend_on_a_black_background_is_left_out_and_the_threshold_kept(caplog) -> None:
    img, _ = _pale_on_black()
    clean = detect_tissue(img, 1.0, UM_PER_PX)
    with caplog.at_level(logging.INFO, logger="cmrcnet.data.tissue"):
        legend = detect_tissue(_legend(img, 10, 10), 1.0, UM_PER_PX)
    assert "left out 1 panel(s)" in caplog.text
    assert _box(legend.mask, 10, 10, 110, 90) == 0.0
    np.testing.assert_array_equal(legend.mask, clean.mask)  # the disc exactly as without the legend
    assert legend.threshold == clean.threshold
    kept = detect_tissue(_legend(img, 10, 10), 1.0, UM_PER_PX, TissueConfig(drop_non_tissue=False))
    assert _box(kept.mask, 10, 10, 110, 90) > 0.9  # what the rule prevents: the legend read as tissue


def test_a_framed_miniature_on_a_black_background_is_left_out_with_its_contents() -> None:
    img, _ = _pale_on_black()
    h, w = img.shape[:2]
    framed = _framed_miniature(img, w - w // 4 - 12, h - h // 4 - 12)
    mask = detect_tissue(framed, 1.0, UM_PER_PX).mask
    clean = detect_tissue(img, 1.0, UM_PER_PX).mask
    assert _box(mask, w - w // 4 - 12, h - h // 4 - 12, w // 4 + 8, h // 4 + 8) == 0.0
    np.testing.assert_array_equal(mask, clean)


def test_green_pen_on_the_glass_is_left_out() -> None:
    img = draw_slide()
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    ring = np.abs(np.hypot(xx - 560, yy - 80) - 45) < 4  # a pen circle on the glass, away from the disc
    img[ring] = (20, 170, 40)
    mask = detect_tissue(img, 1.0, UM_PER_PX).mask
    assert not mask[ring].any()
    cx, cy, r = DISC
    assert mask[np.hypot(xx - cx, yy - cy) < r - 2].mean() > 0.99


def test_the_largest_object_is_never_dropped(caplog) -> None:
    rng = np.random.default_rng(0)
    img = np.full((260, 400, 3), 245, np.uint8)
    img[40:160, 60:240] = (200, 110, 170)  # one rectangular piece of tissue (e.g. a cropped region), plain
    img[180:240, 10:70] = (200, 110, 170)  # a smaller plain rectangle: a panel
    img[180:240, 300:360] = np.clip(rng.normal((200, 110, 170), 12, (60, 60, 3)), 0, 255)  # textured: tissue
    mask = detect_tissue(img, 1.0, UM_PER_PX).mask
    assert mask[42:158, 62:238].all() and not mask[180:240, 10:70].any()  # (corners rounded by the median filter)
    assert mask[182:238, 302:358].all()  # a small piece of tissue cut square is not a panel
    green = np.full((200, 360, 3), 245, np.uint8)
    green[40:160, 60:240] = (30, 180, 60)  # only green objects: the largest stays, the other (a disc) is ink
    yy, xx = np.mgrid[0:200, 0:360]
    disc = np.hypot(xx - 310, yy - 60) <= 30
    green[disc] = (30, 180, 60)
    with caplog.at_level(logging.WARNING, logger="cmrcnet.data.tissue"):
        mask = detect_tissue(green, 1.0, UM_PER_PX).mask
    assert mask[42:158, 62:238].all() and not mask[disc].any()
    assert "1 ink object(s)" in caplog.text


def test_predict_slide_leaves_the_legend_out(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img, _ = _pale_on_black()
    png = tmp_path / "legend.png"
    Image.fromarray(_legend(img, 10, 10)).save(png)
    assert _predict(run, png, tmp_path / "out", "--pixel-size", str(UM_PER_PX)) == 0
    assert "not H&E tissue" in capsys.readouterr().err
    a = ad.read_h5ad(tmp_path / "out" / "prediction.h5ad")
    xy = a.obsm["spatial"]
    in_legend = (xy[:, 0] < 10 + 110 + FOV_PX / 2) & (xy[:, 1] < 10 + 90 + FOV_PX / 2)
    far = np.hypot(xy[:, 0] - DISC[0], xy[:, 1] - DISC[1]) > DISC[2] + FOV_PX
    assert not (in_legend & far).any()  # no tile for the legend
    assert "1 panel(s)" in a.uns["cmrcnet"]["tissue"]["left_out"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any("not H&E tissue" in w for w in summary["warnings"])


def test_keep_all_objects_keeps_the_legend(run: Path, tmp_path: Path) -> None:
    img, _ = _pale_on_black()
    png = tmp_path / "legend.png"
    Image.fromarray(_legend(img, 10, 10)).save(png)
    assert _predict(run, png, tmp_path / "out", "--pixel-size", str(UM_PER_PX), "--keep-all-objects") == 0
    a = ad.read_h5ad(tmp_path / "out" / "prediction.h5ad")
    assert a.uns["cmrcnet"]["tissue"]["drop_non_tissue"] is False
    xy = a.obsm["spatial"]
    assert ((xy[:, 0] < 10 + 110) & (xy[:, 1] < 10 + 90)).any()  # a tile on the legend


def test_pale_lace_between_fibres_is_tissue_but_glass_between_pieces_is_not() -> None:
    """Loose stroma: stained fibres 3 px wide every 12 px (24 um gaps at 2 um/px) over a 200 x 200 px piece, and a
    second solid piece 100 px (200 um) to its right."""
    img = np.full((300, 520, 3), 245, np.uint8)
    lace = np.zeros((300, 520), bool)
    lace[50:250, 50:250] = (np.arange(50, 250) % 12 < 3)[None, :] | (np.arange(50, 250) % 12 < 3)[:, None]
    rng = np.random.default_rng(0)
    stain = np.clip(rng.normal((200, 110, 170), 12, img.shape), 0, 255).astype(np.uint8)  # textured tissue
    img[lace] = stain[lace]
    img[50:250, 350:450] = stain[50:250, 350:450]
    mask = detect_tissue(img, 1.0, UM_PER_PX).mask
    assert mask[55:245, 55:245].mean() > 0.99  # the gaps between fibres are bridged
    assert not mask[100:200, 265:335].any()  # 200 um of glass between the pieces stays glass
    assert mask[55:245, 355:445].all()  # the square piece is tissue (textured: not a panel)
    lace_only = detect_tissue(img, 1.0, UM_PER_PX, TissueConfig(close_um=0.0, min_hole_um2=0.0)).mask
    assert lace_only[55:245, 55:245].mean() < 0.5  # the threshold alone: the fibres only
    np.testing.assert_array_equal(mask[:, 0], False)  # the image border is not eroded nor grown into
