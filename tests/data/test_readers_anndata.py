"""Generic .h5ad reader: raw-count detection, pixel-size sources, errors."""

from __future__ import annotations

import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from cmrcnet.constants import SPATIAL_KEY
from cmrcnet.data.readers import read_anndata, read_sample
from cmrcnet.errors import ConfigError, InputFileError

PITCH_PX = 120.0


def visium_like(n_rows: int = 4, n_cols: int = 10, seed: int = 0) -> ad.AnnData:
    """A hexagonal Visium-like AnnData: raw integer counts in X, obsm["spatial"] in full-resolution pixels."""
    rows, cols = np.mgrid[0:n_rows, 0:n_cols]
    keep = (rows + cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    xy = np.column_stack([50 + cols * PITCH_PX / 2, 50 + rows * PITCH_PX * math.sqrt(3) / 2])  # (N, 2)
    counts = np.random.default_rng(seed).poisson(5.0, size=(len(rows), 8)).astype(np.float32) + 1
    a = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"s{i}" for i in range(len(rows))]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(8)]),
    )
    a.obsm[SPATIAL_KEY] = xy
    return a


def normalised(a: ad.AnnData) -> np.ndarray:
    x = a.X.toarray()
    return np.log1p(x / x.sum(1, keepdims=True) * 1e4)


def test_raw_counts_in_x(tmp_path):
    path = tmp_path / "slide.h5ad"
    visium_like().write_h5ad(path)
    img = tmp_path / "he.png"
    Image.new("RGB", (700, 400)).save(img)
    s = read_anndata(path, image=img, technology="visium")
    assert s.sample_id == "slide" and s.patient_id == "slide" and s.technology == "visium"
    assert s.n_spots == 20 and s.image.size == (700, 400) and s.image._array is None
    # estimated on the hexagonal grid through obs array_row/array_col
    assert s.pixel_size_um == pytest.approx(100.0 / PITCH_PX) and s.pixel_size_source == "estimated"
    assert s.source == {"format": "anndata", "counts": str(path), "image": str(img)}


@pytest.mark.parametrize("where", ["layer", "raw"])
def test_counts_from_layer_or_raw(tmp_path, where):
    a = visium_like()
    raw_counts = a.X.toarray()
    if where == "layer":
        a.layers["counts"] = a.X.copy()
    else:
        a.raw = a.copy()
    a.X = normalised(a)
    a.write_h5ad(tmp_path / "n.h5ad")
    s = read_anndata(tmp_path / "n.h5ad", sample_id="n1", technology="visium")
    np.testing.assert_array_equal(s.counts.X.toarray(), raw_counts)


def test_only_normalised_values(tmp_path):
    a = visium_like()
    a.X = normalised(a)
    a.write_h5ad(tmp_path / "n.h5ad")
    with pytest.raises(InputFileError, match=r"n\.h5ad: no raw counts found \(checked X\)"):
        read_anndata(tmp_path / "n.h5ad", technology="visium")


def test_pixel_size_sources(tmp_path):
    a = visium_like()
    a.uns["spatial"] = {
        "lib1": {"scalefactors": {"spot_diameter_fullres": 130.0, "tissue_hires_scalef": 0.1}}
    }
    a.write_h5ad(tmp_path / "v.h5ad")
    s = read_anndata(tmp_path / "v.h5ad", technology="visium")
    assert (s.pixel_size_um, s.pixel_size_source) == (pytest.approx(65.0 / 130.0), "estimated")
    s = read_anndata(tmp_path / "v.h5ad", technology="visium", pixel_size_um=0.3)
    assert (s.pixel_size_um, s.pixel_size_source) == (0.3, "user")
    a.uns["pixel_size_um"] = 0.42
    a.write_h5ad(tmp_path / "m.h5ad")
    s = read_anndata(tmp_path / "m.h5ad")  # technology unknown is fine when the file records the pixel size
    assert (s.pixel_size_um, s.pixel_size_source) == (0.42, "metadata")


def test_unknown_technology_needs_pixel_size(tmp_path):
    visium_like().write_h5ad(tmp_path / "u.h5ad")
    with pytest.raises(InputFileError, match=r"u\.h5ad: no pixel size .* pass pixel_size_um="):
        read_anndata(tmp_path / "u.h5ad")
    assert read_sample("anndata", input=tmp_path / "u.h5ad", pixel_size_um=0.5).pixel_size_source == "user"
    with pytest.raises(ConfigError, match="unknown technology"):
        read_anndata(tmp_path / "u.h5ad", technology="slide-seq")


def test_st_technology_without_array_columns(tmp_path):
    a = visium_like()
    a.obs = a.obs.drop(columns=["array_row", "array_col"])
    yy, xx = np.mgrid[0:4, 0:5]
    a.obsm[SPATIAL_KEY] = np.column_stack([10 + xx.ravel() * 250.0, 10 + yy.ravel() * 250.0])
    a.write_h5ad(tmp_path / "st.h5ad")
    s = read_anndata(tmp_path / "st.h5ad", technology="st")
    assert s.pixel_size_um == pytest.approx(200.0 / 250.0)


# --- errors -----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match=r"none\.h5ad: AnnData file not found"):
        read_anndata(tmp_path / "none.h5ad")
    visium_like().write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(InputFileError, match=r"he\.png: H&E image not found"):
        read_anndata(tmp_path / "a.h5ad", image=tmp_path / "he.png")


def test_truncated_and_not_hdf5(tmp_path):
    path = tmp_path / "t.h5ad"
    visium_like().write_h5ad(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match=r"t\.h5ad: cannot read AnnData file"):
        read_anndata(path, technology="visium")
    path.write_text("hello")
    with pytest.raises(InputFileError, match=r"t\.h5ad: cannot read AnnData file"):
        read_anndata(path, technology="visium")


def test_no_coordinates(tmp_path):
    a = visium_like()
    del a.obsm[SPATIAL_KEY]
    a.write_h5ad(tmp_path / "c.h5ad")
    with pytest.raises(InputFileError, match=r'c\.h5ad: no spot coordinates: obsm\["spatial"\] is missing'):
        read_anndata(tmp_path / "c.h5ad", technology="visium")


def test_image_smaller_than_coordinates(tmp_path):
    visium_like().write_h5ad(tmp_path / "a.h5ad")
    Image.new("RGB", (100, 100)).save(tmp_path / "small.png")
    with pytest.raises(InputFileError, match=r"small\.png: image is 100 x 100 .* outside it"):
        read_anndata(tmp_path / "a.h5ad", image=tmp_path / "small.png", technology="visium")


@pytest.mark.parametrize(("value", "message"), [(-2.0, "negative"), (np.nan, "NaN")])
def test_bad_counts(tmp_path, value, message):
    a = visium_like()
    x = a.X.toarray()
    x[1, 1] = value
    a.X = x
    a.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(InputFileError, match=rf"b\.h5ad: counts contain {message}"):
        read_anndata(tmp_path / "b.h5ad", technology="visium")


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_duplicated_spot_ids(tmp_path):
    a = visium_like()
    a.obs_names = ["dup"] * 2 + list(a.obs_names[2:])
    a.write_h5ad(tmp_path / "d.h5ad")
    with pytest.raises(InputFileError, match=r"d\.h5ad: duplicated spot ids: \['dup'\]"):
        read_anndata(tmp_path / "d.h5ad", technology="visium")


def test_accepts_string_path(tmp_path):
    a = visium_like()
    a.write_h5ad(tmp_path / "p.h5ad")
    s = read_anndata(str(tmp_path / "p.h5ad"), technology="visium")
    assert Path(s.source["counts"]) == tmp_path / "p.h5ad"
