"""Predictions follow scanpy's spatial conventions: `sc.pl.spatial(pred, color=gene)` draws them on the tissue
with no extra arguments (uns["spatial"][library_id] with an image and scale factors, as Space Ranger gives)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cmrcnet import api

from test_slide import UM_PER_PX, draw_slide

pytestmark = pytest.mark.extra


@pytest.fixture(scope="module")
def sc():
    scanpy = pytest.importorskip("scanpy", reason="optional: pip install scanpy")
    import matplotlib

    matplotlib.use("Agg")
    return scanpy


def _drawn(sc, adata, gene: str, path: Path) -> np.ndarray:
    import matplotlib.pyplot as plt

    sc.pl.spatial(adata, color=gene, show=False)
    plt.savefig(path)
    plt.close("all")
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_spot_and_slide_predictions_draw_on_the_tissue(sc, run: Path, tmp_path: Path) -> None:
    from PIL import Image

    model = api.Model.load(run)
    ds = Path(model.trained.run_info["data_dir"])
    pred = model.predict(ds, ["synS1"], progress=False)
    lib = pred.uns["spatial"]["synS1"]
    assert lib["images"]["hires"].ndim == 3 and lib["scalefactors"]["spot_diameter_fullres"] > 0
    assert set(pred.obs["library_id"]) == {"synS1"}
    img = _drawn(sc, pred, model.genes[0], tmp_path / "spots.png")
    assert img.std() > 5  # a drawn figure, not a blank page

    slide = tmp_path / "slide.png"
    Image.fromarray(draw_slide()).save(slide)
    tiles = model.predict_slide(slide, tmp_path / "slide_out", pixel_size_um=UM_PER_PX, progress=False)
    scale = tiles.uns["spatial"][tiles.obs["library_id"].iloc[0]]["scalefactors"]
    assert scale["spot_diameter_fullres"] == pytest.approx(tiles.uns["cmrcnet"]["fov_px"])
    img = _drawn(sc, tiles, model.genes[0], tmp_path / "tiles.png")
    assert img.std() > 5
