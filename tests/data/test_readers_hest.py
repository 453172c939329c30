"""HEST-1k reader on a tiny HEST-layout sample written in tmp_path."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import tifffile

from cmrcnet.constants import SPATIAL_KEY
from cmrcnet.data.readers import read_hest, read_hest_patches, read_sample
from cmrcnet.errors import ConfigError, InputFileError

SID = "TENX00"
WSI_SIZE = (600, 500)  # (width, height)


def write_hest(
    root: Path,
    *,
    meta: dict | None = None,
    wsi: bool = True,
    wsi_size: tuple[int, int] = WSI_SIZE,
    patch_px: int = 8,
) -> Path:
    """st/, wsis/, metadata/ and patches/ for one 4 x 5 spot sample (100 px pitch, spots from (100, 80))."""
    for d in ("st", "wsis", "metadata", "patches"):
        (root / d).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:4, 0:5]
    xy = np.column_stack([100.0 + xx.ravel() * 100.0, 80.0 + yy.ravel() * 100.0])  # (20, 2) (x, y)
    barcodes = [f"AAAC{i:02d}-1" for i in range(len(xy))]
    counts = np.random.default_rng(0).poisson(4.0, size=(len(xy), 7)).astype(np.float64)
    a = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"array_row": yy.ravel(), "array_col": xx.ravel() * 2}, index=barcodes),
        var=pd.DataFrame(index=[f"GENE{i}" for i in range(7)]),
    )
    a.obsm[SPATIAL_KEY] = xy
    a.uns["spatial"] = {"ST": {"images": {"downscaled_fullres": np.zeros((5, 6, 3), np.uint8)}}}
    a.write_h5ad(root / "st" / f"{SID}.h5ad")
    if wsi:
        w, h = wsi_size
        level0 = np.full((h, w, 3), 230, np.uint8)
        # pyramidal generic TIFF as HEST ships: level 0 plus a half-size level in a SubIFD
        with tifffile.TiffWriter(root / "wsis" / f"{SID}.tif") as tif:
            tif.write(level0, tile=(128, 128), subifds=1)
            tif.write(level0[::2, ::2], tile=(128, 128), subfiletype=1)
    metadata = {
        "dataset_title": "A tiny study",
        "patient": "Patient 1",
        "st_technology": "Visium",
        "pixel_size_um_estimated": 0.55,
        "pixel_size_um_embedded": 0.5,
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
    }
    metadata.update(meta or {})
    with open(root / "metadata" / f"{SID}.json", "w") as fh:
        json.dump(metadata, fh)  # writes NaN as a bare NaN, like HEST
    with h5py.File(root / "patches" / f"{SID}.h5", "w") as f:
        f["img"] = np.full((len(xy), patch_px, patch_px, 3), 7, np.uint8)
        f["barcode"] = np.array([[b.encode()] for b in barcodes])  # (N, 1) bytes
        f["coords"] = (xy - patch_px // 2).astype(np.int64)  # top-left corners
    return root


def test_read_hest(tmp_path):
    root = write_hest(tmp_path)
    s = read_hest(root, sample_id=SID)
    assert (s.n_spots, s.counts.n_vars) == (20, 7)
    assert s.technology == "hest"
    assert (s.pixel_size_um, s.pixel_size_source) == (0.55, "metadata")
    assert s.patient_id == "A tiny study / Patient 1"
    assert s.image is not None and s.image.path.name == f"{SID}.tif" and s.image.scale == 1.0
    assert s.image.size == WSI_SIZE and s.image._array is None
    np.testing.assert_allclose(s.coords[1], [200.0, 80.0])
    assert "uns" not in s.source and not s.counts.uns.get("spatial")  # downscaled image not carried along
    assert {"counts", "metadata", "image"} <= set(s.source)
    assert s.counts.obs["array_col"].tolist()[:2] == [0, 2]


def test_overrides_and_fallbacks(tmp_path, caplog):
    root = write_hest(tmp_path, meta={"patient": None, "pixel_size_um_estimated": float("nan")}, wsi=False)
    with caplog.at_level(logging.INFO):
        s = read_sample("hest", input=root, sample_id=SID, image=None)
    assert s.image is None and "no whole-slide image" in caplog.text
    assert s.patient_id == SID
    assert (s.pixel_size_um, s.pixel_size_source) == (0.5, "metadata")  # embedded value when estimated is NaN
    s = read_hest(root, sample_id=SID, patient_id="P9", pixel_size_um=0.25)
    assert (s.patient_id, s.pixel_size_um, s.pixel_size_source) == ("P9", 0.25, "user")
    with pytest.raises(ConfigError, match="accepted options"):
        read_sample("hest", input=root, sample_id=SID, image=root / "x.tif")


def test_pixel_size_estimated_when_metadata_has_none(tmp_path):
    root = write_hest(tmp_path, meta={"pixel_size_um_estimated": None, "pixel_size_um_embedded": None})
    s = read_hest(root, sample_id=SID)
    # Visium pitch (100 um) over the 100 px first-shell spacing of this synthetic square layout
    assert (s.pixel_size_um, s.pixel_size_source) == (pytest.approx(1.0), "estimated")
    root = write_hest(
        tmp_path,
        meta={"pixel_size_um_estimated": None, "pixel_size_um_embedded": None, "st_technology": "Xenium"},
    )
    with pytest.raises(InputFileError, match=r"TENX00\.json: no pixel size .* pass pixel_size_um="):
        read_hest(root, sample_id=SID)


def test_read_hest_patches(tmp_path):
    root = write_hest(tmp_path)
    img, barcodes, coords = read_hest_patches(root, SID)
    assert img.shape == (20, 8, 8, 3) and img.dtype == np.uint8
    assert barcodes[:2] == ["AAAC00-1", "AAAC01-1"]
    s = read_hest(root, sample_id=SID)
    assert barcodes == list(s.counts.obs_names)
    np.testing.assert_array_equal(coords + 4, s.coords)  # top-left corners + half the side = centres


# --- errors -----------------------------------------------------------------------------------------------


def test_missing_files(tmp_path):
    with pytest.raises(InputFileError, match="HEST folder not found"):
        read_hest(tmp_path / "nope", sample_id=SID)
    root = write_hest(tmp_path)
    with pytest.raises(InputFileError, match=r"st/TENX99\.h5ad: HEST expression file not found"):
        read_hest(root, sample_id="TENX99")
    with pytest.raises(InputFileError, match=r"patches/TENX99\.h5: HEST patch file not found"):
        read_hest_patches(root, "TENX99")
    (root / "metadata" / f"{SID}.json").unlink()
    with pytest.raises(InputFileError, match=r"TENX00\.json: HEST metadata not found .* pixel_size_um="):
        read_hest(root, sample_id=SID)
    assert read_hest(root, sample_id=SID, pixel_size_um=0.5).patient_id == SID


@pytest.mark.parametrize("which", ["st/TENX00.h5ad", "patches/TENX00.h5"])
def test_truncated_files(tmp_path, which):
    root = write_hest(tmp_path)
    p = root / which
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match=re.escape(p.name) + ": cannot read"):
        if which.startswith("st/"):
            read_hest(root, sample_id=SID)
        else:
            read_hest_patches(root, SID)


def test_bad_metadata_json(tmp_path):
    root = write_hest(tmp_path)
    (root / "metadata" / f"{SID}.json").write_text("{not json")
    with pytest.raises(InputFileError, match=r"TENX00\.json: cannot parse metadata JSON"):
        read_hest(root, sample_id=SID)


def test_wsi_smaller_than_coordinates(tmp_path):
    root = write_hest(tmp_path, wsi_size=(300, 300))
    with pytest.raises(InputFileError, match=r"TENX00\.tif: image is 300 x 300 .* outside it"):
        read_hest(root, sample_id=SID)


def test_patch_file_without_barcodes(tmp_path):
    root = write_hest(tmp_path)
    with h5py.File(root / "patches" / f"{SID}.h5", "a") as f:
        del f["barcode"]
    with pytest.raises(InputFileError, match=r"lacks datasets \['barcode'\]"):
        read_hest_patches(root, SID)


def test_a_legacy_st_sample_of_hest_gets_the_st_field_of_view(tmp_path):
    from cmrcnet.data.prepare import default_fov_um

    visium = read_hest(write_hest(tmp_path / "v"), sample_id=SID)
    legacy = read_hest(write_hest(tmp_path / "st", meta={"st_technology": "Spatial Transcriptomics"}), sample_id=SID)
    assert visium.source["st_technology"] == "visium" and default_fov_um(visium) == 112.0
    assert legacy.source["st_technology"] == "spatial transcriptomics" and default_fov_um(legacy) == 224.0
