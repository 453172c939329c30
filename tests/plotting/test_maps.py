"""Tests for cmrcnet.plotting.maps: PNGs are written (atomically), valid and non-trivial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cmrcnet.plotting.maps import plot_expression_maps, plot_pcc_distribution

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _grid(n_rows: int = 5, n_cols: int = 6, pitch: float = 40.0) -> np.ndarray:
    yy, xx = np.mgrid[0:n_rows, 0:n_cols]
    return np.stack([60 + xx.ravel() * pitch, 60 + yy.ravel() * pitch], axis=1).astype(np.float64)  # (N, 2)


def _check_png(path: Path, min_colours: int = 20) -> np.ndarray:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[0] > 100 and arr.shape[1] > 100
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) >= min_colours  # more than a blank canvas
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temporary sibling left
    return arr


def _data(n_spots: int, n_genes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    measured = rng.gamma(2.0, 1.0, size=(n_spots, n_genes))
    return measured, measured + rng.normal(0, 0.5, size=measured.shape)


def test_expression_maps_over_thumbnail(tmp_path: Path) -> None:
    coords = _grid()
    measured, predicted = _data(len(coords), 3)
    thumb = np.full((160, 180, 3), 220, np.uint8)  # thumbnail at half the full resolution
    thumb[40:120, 40:140] = (200, 120, 180)
    path = tmp_path / "maps_s1_best.png"
    plot_expression_maps(
        thumb,
        0.5,
        coords,
        measured,
        predicted,
        ["A", "B", "C"],
        [0.8, 0.5, float("nan")],
        path,
        title="s1 best",
    )
    arr = _check_png(path)
    assert arr.shape[0] > arr.shape[1]  # three rows of two panels


def test_expression_maps_without_thumbnail(tmp_path: Path) -> None:
    coords = _grid()
    measured, predicted = _data(len(coords), 1, seed=1)
    predicted[:, 0] = 2.0  # a constant prediction still plots (shared colour scale)
    path = tmp_path / "sub" / "maps_s2_markers.png"
    plot_expression_maps(None, None, coords, measured, predicted, ["ERBB2"], [float("nan")], path, title="s2")
    _check_png(path)


def test_pcc_distribution(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "sample_id": ["a"] * 40 + ["b"] * 40,
            "gene": [f"G{i}" for i in range(80)],
            "pcc": np.clip(rng.normal(0.3, 0.2, 80), -1, 1),
        }
    )
    df.loc[3, "pcc"] = np.nan  # a constant gene
    path = tmp_path / "pcc_distribution.png"
    plot_pcc_distribution(df, path, title="per-gene PCC")
    _check_png(path)
    single = tmp_path / "single.png"
    plot_pcc_distribution(df[["pcc"]], single, title="one sample")
    _check_png(single)
