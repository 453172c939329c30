"""Tests for the SYNTHETIC dataset generator (cmrcnet.data.synthetic)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmrcnet.constants import DEFAULT_FOV_UM, PATIENT_KEY, SAMPLE_KEY
from cmrcnet.data.sample import check_coords_inside_image
from cmrcnet.data.synthetic import (
    PROGRAMS,
    PROGRAMS_KEY,
    SyntheticConfig,
    gene_names,
    image_size_px,
    make_synthetic_samples,
    marker_genes,
    write_synthetic_raw,
)
from cmrcnet.errors import ConfigError

SMALL = SyntheticConfig(n_slides=2, n_rows=8, n_cols=8, n_genes=40, seed=3)


@pytest.fixture(scope="module")
def small_samples():
    return make_synthetic_samples(SMALL)


@pytest.fixture(scope="module")
def default_samples():
    return make_synthetic_samples(SyntheticConfig())


def _dense(sample) -> np.ndarray:
    return np.asarray(sample.counts.X.todense())


def test_shapes_and_metadata(small_samples):
    assert [s.sample_id for s in small_samples] == ["synS1", "synS2"]
    assert [s.patient_id for s in small_samples] == ["synP1", "synP2"]
    w, h = image_size_px(SMALL)
    for s in small_samples:
        assert s.image.array().shape == (h, w, 3)
        assert s.image.array().dtype == np.uint8
        assert 0 < s.n_spots <= SMALL.n_rows * SMALL.n_cols
        assert s.counts.var_names.tolist() == gene_names(SMALL)
        assert s.counts.n_vars == SMALL.n_genes
        assert s.coords.shape == (s.n_spots, 2)
        assert s.counts.obsm[PROGRAMS_KEY].shape == (s.n_spots, len(PROGRAMS))
        assert np.allclose(s.counts.obsm[PROGRAMS_KEY].sum(axis=1), 1.0)
        assert (s.counts.obs[SAMPLE_KEY] == s.sample_id).all()
        assert (s.counts.obs[PATIENT_KEY] == s.patient_id).all()
        assert s.pixel_size_um == SMALL.pixel_size_um
        assert s.pixel_size_source == "metadata"


def test_patients_round_robin():
    config = SyntheticConfig(n_slides=3, n_patients=2, n_rows=4, n_cols=4, n_genes=12)
    assert [s.patient_id for s in make_synthetic_samples(config)] == ["synP1", "synP2", "synP1"]


def test_labelled_synthetic(small_samples):
    for s in small_samples:
        assert s.technology == "synthetic"
        assert s.counts.uns["synthetic"] is True
        assert "SYNTHETIC" in s.counts.uns["synthetic_description"]
        assert "SYNTHETIC" in s.source["note"]
        assert s.source["generator"] == "cmrcnet.data.synthetic"
        assert s.source["seed"] == str(SMALL.seed)
        assert str(s.image.path).startswith("synthetic:")


def test_deterministic(small_samples):
    again = make_synthetic_samples(SMALL)
    for a, b in zip(small_samples, again, strict=True):
        np.testing.assert_array_equal(a.image.array(), b.image.array())
        np.testing.assert_array_equal(_dense(a), _dense(b))
        np.testing.assert_array_equal(a.coords, b.coords)
        assert a.counts.obs_names.tolist() == b.counts.obs_names.tolist()
    other = make_synthetic_samples(SyntheticConfig(n_slides=2, n_rows=8, n_cols=8, n_genes=40, seed=4))
    assert not np.array_equal(other[0].image.array(), small_samples[0].image.array())


def test_counts_are_non_negative_integers(small_samples):
    for s in small_samples:
        x = _dense(s)
        assert x.min() >= 0
        np.testing.assert_array_equal(x, np.round(x))
        assert x.sum(axis=1).min() > 0


def test_coords_inside_image_with_margin(small_samples):
    w, h = image_size_px(SMALL)
    half_fov_px = DEFAULT_FOV_UM / 2 / SMALL.pixel_size_um
    for s in small_samples:
        check_coords_inside_image(s, path="synthetic")
        xy = s.coords
        assert xy[:, 0].min() >= half_fov_px and xy[:, 1].min() >= half_fov_px
        assert xy[:, 0].max() <= w - half_fov_px and xy[:, 1].max() <= h - half_fov_px
        # spot ids are "{x}x{y}" array positions on the square grid
        ax, ay = s.counts.obs["array_x"].to_numpy(), s.counts.obs["array_y"].to_numpy()
        assert s.counts.obs_names.tolist() == [f"{x}x{y}" for x, y in zip(ax, ay, strict=True)]
        expected = SMALL.margin_um + (np.stack([ax, ay], axis=1) - 1) * SMALL.spot_pitch_um
        np.testing.assert_allclose(xy, expected / SMALL.pixel_size_um, atol=6.0)


def test_spots_lie_on_tissue(small_samples):
    for s in small_samples:
        img = s.image.array().astype(np.float64)
        centre = [img[int(y) - 5 : int(y) + 6, int(x) - 5 : int(x) + 6].mean() for x, y in s.coords]
        assert np.mean(np.array(centre) < 235) >= 0.9  # tissue, not glass (white)
    assert np.percentile(img, 99) > 235  # some glass exists around the tissue


def test_config_validation():
    with pytest.raises(ConfigError, match="n_genes"):
        SyntheticConfig(n_genes=5)
    with pytest.raises(ConfigError, match="margin_um"):
        SyntheticConfig(margin_um=10.0)
    with pytest.raises(ConfigError, match="n_patients"):
        SyntheticConfig(n_slides=2, n_patients=3)
    with pytest.raises(ConfigError, match="pixel_size_um"):
        SyntheticConfig(pixel_size_um=0.0)


def test_marker_genes():
    markers = marker_genes()
    assert set(markers.values()) == {*PROGRAMS, "noise"}
    assert set(markers) <= set(gene_names(SMALL))
    markers["SYN_TUMOR1"] = "changed"
    assert marker_genes()["SYN_TUMOR1"] == "tumour"  # a copy


def _hematoxylin(img: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density per pixel by colour deconvolution (Ruifrok & Johnston 2001, as rgb2hed)."""
    stains = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    od = -np.log(np.maximum(img.astype(np.float64), 1.0) / 255.0)  # (H, W, 3)
    return (od @ np.linalg.inv(stains))[..., 0]  # (H, W)


def test_expression_depends_on_morphology(default_samples):
    """Marker genes follow simple image features of the field of view around each spot; a noise gene does not."""
    half = int(DEFAULT_FOV_UM / 2)  # default pixel size is 1 um
    features, log_expr = [], []
    for s in default_samples:
        hema = _hematoxylin(s.image.array())
        for x, y in s.coords.astype(int):
            window = hema[y - half : y + half, x - half : x + half]
            pale = ((window > 0.3) & (window < 1.0)).mean()  # large vesicular (tumour) nuclei
            dark = (window > 1.0).mean()  # small very dark (immune) nuclei
            features.append([pale, dark, window.mean()])
        x = _dense(s)
        log_expr.append(np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4))
    features, log_expr = np.array(features), np.vstack(log_expr)
    genes = default_samples[0].counts.var_names.tolist()

    def corr(feature: int, gene: str) -> float:
        return float(np.corrcoef(features[:, feature], log_expr[:, genes.index(gene)])[0, 1])

    assert corr(0, "SYN_TUMOR1") > 0.5
    assert corr(1, "SYN_IMMUNE1") > 0.5
    assert corr(2, "SYN_STROMA1") < -0.5  # stroma: few nuclei, mostly eosin
    for feature in range(3):
        assert abs(corr(feature, "SYN_NOISE1")) < 0.3


def test_write_raw_round_trip(tmp_path, small_samples):
    out = tmp_path / "raw"
    written = write_synthetic_raw(out, SMALL)
    assert all(p.is_file() for p in written)
    assert "SYNTHETIC" in (out / "SYNTHETIC_README.txt").read_text()
    assert not list(out.rglob(".*"))  # no temporary files left behind
    for s in small_samples:
        counts = pd.read_csv(out / "counts" / f"{s.sample_id}.tsv.gz", sep="\t", index_col=0)
        assert counts.index.tolist() == s.counts.obs_names.tolist()
        assert counts.columns.tolist() == s.counts.var_names.tolist()
        np.testing.assert_array_equal(counts.to_numpy(), _dense(s))
        selection = pd.read_csv(out / "spots" / f"{s.sample_id}_selection.tsv", sep="\t")
        assert selection.columns.tolist() == ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]
        ids = [f"{x}x{y}" for x, y in zip(selection["x"], selection["y"], strict=True)]
        assert ids == s.counts.obs_names.tolist()
        np.testing.assert_allclose(selection[["pixel_x", "pixel_y"]].to_numpy(), s.coords, atol=0.01)
        np.testing.assert_allclose(selection["new_x"], selection["x"], atol=0.1)
        assert (selection["selected"] == 1).all()
        with Image.open(out / "images" / f"{s.sample_id}.png") as im:
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), s.image.array())
    # same seed, same bytes (gzip without a timestamp)
    again = write_synthetic_raw(tmp_path / "again", SMALL)
    assert [p.read_bytes() for p in written] == [p.read_bytes() for p in again]
