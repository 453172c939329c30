"""Visium reader: synthetic Space Ranger folders (both positions layouts) and squidpy's visium_tiny fixture."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image

from cmrcnet.constants import SPATIAL_KEY
from cmrcnet.data.readers import read_10x_h5, read_sample, read_visium
from cmrcnet.data.readers.visium import POSITION_COLUMNS
from cmrcnet.errors import InputFileError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
UM_PER_PX = 0.725  # full-resolution pixel size of the synthetic folders
PITCH_PX = 100.0 / UM_PER_PX
HIRES_SCALE = 0.25
FEATURES = [
    ("G1", "Gene Expression"),
    ("G2", "Gene Expression"),
    ("G3", "Gene Expression"),
    ("CD3", "Antibody Capture"),
]


def write_10x_h5(
    path: Path, counts: np.ndarray, barcodes: list[str], features: list[tuple[str, str]]
) -> None:
    """The 10x HDF5 layout: genes x barcodes CSC under /matrix."""
    m = sp.csc_matrix(counts.T)  # (n_features, n_barcodes)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        fg = g.create_group("features")
        fg["name"] = np.array([n.encode() for n, _ in features])
        fg["id"] = np.array([f"ENSG{i:05d}".encode() for i in range(len(features))])
        fg["feature_type"] = np.array([t.encode() for _, t in features])


def write_visium_dir(root: Path, *, header: bool = True, image: bool = True) -> Path:
    """A 6-row x 12-column hexagonal capture area; spot (row 0, col 0) is outside the tissue."""
    rows, cols = np.mgrid[0:6, 0:12]
    keep = (rows + cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    barcodes = [f"BC{i:03d}-1" for i in range(len(rows))]
    px_col = 300.0 + cols * PITCH_PX / 2.0
    px_row = 300.0 + rows * PITCH_PX * math.sqrt(3.0) / 2.0
    pos = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": (np.arange(len(rows)) > 0).astype(int),
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": np.round(px_row).astype(int),
            "pxl_col_in_fullres": np.round(px_col).astype(int),
        }
    )
    (root / "spatial").mkdir(parents=True, exist_ok=True)
    if header:
        pos.to_csv(root / "spatial" / "tissue_positions.csv", index=False)
    else:
        pos.to_csv(root / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    counts = np.random.default_rng(0).poisson(2.0, size=(len(rows), len(FEATURES))) + 1
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", counts[1:], barcodes[1:], FEATURES)
    factors = {
        "spot_diameter_fullres": 65.0 / UM_PER_PX,
        "tissue_hires_scalef": HIRES_SCALE,
        "fiducial_diameter_fullres": 100.0,
        "tissue_lowres_scalef": HIRES_SCALE / 4,
    }
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    if image:
        Image.new("RGB", (400, 350), (220, 190, 210)).save(root / "spatial" / "tissue_hires_image.png")
    return root


@pytest.mark.parametrize("header", [True, False])
def test_read_visium(tmp_path, header):
    root = write_visium_dir(tmp_path / "outs", header=header)
    s = read_visium(root)
    assert s.sample_id == "outs" and s.patient_id == "outs" and s.technology == "visium"
    assert s.n_spots == 35 and "BC000-1" not in s.counts.obs_names  # out-of-tissue barcode is dropped
    assert list(s.counts.var_names) == ["G1", "G2", "G3"]  # antibody capture dropped
    assert s.counts.var["gene_ids"].tolist() == ["ENSG00000", "ENSG00001", "ENSG00002"]
    assert s.image is not None and s.image.path.name == "tissue_hires_image.png"
    assert s.image.scale == HIRES_SCALE and s.image._array is None
    assert s.pixel_size_um == pytest.approx(UM_PER_PX) and s.pixel_size_source == "estimated"
    pos = pd.read_csv(
        root / "spatial" / ("tissue_positions.csv" if header else "tissue_positions_list.csv"),
        header=0 if header else None,
        names=None if header else ["barcode", *POSITION_COLUMNS],
    )
    first = pos.set_index("barcode").loc[s.counts.obs_names[0]]
    # obsm["spatial"] is (x, y) = (pxl_col, pxl_row)
    np.testing.assert_allclose(s.coords[0], [first["pxl_col_in_fullres"], first["pxl_row_in_fullres"]])
    assert set(s.counts.obs.columns) >= {"in_tissue", "array_row", "array_col"}
    assert s.source["positions"].endswith(".csv") and "scalefactors" in s.source
    assert sp.isspmatrix_csr(s.counts.X) and s.counts.X.dtype == np.float32


def test_full_resolution_image_and_options(tmp_path, caplog):
    root = write_visium_dir(tmp_path / "outs")
    full = tmp_path / "full.tif"
    Image.new("RGB", (1600, 1400), (220, 190, 210)).save(full)
    with caplog.at_level(logging.INFO):
        s = read_visium(root, image=full, sample_id="V1", patient_id="P1", pixel_size_um=0.5)
    assert s.image.scale == 1.0 and s.image.path == full and "full-resolution image" in caplog.text
    assert (s.sample_id, s.patient_id, s.pixel_size_um, s.pixel_size_source) == ("V1", "P1", 0.5, "user")


def test_grid_estimate_without_spot_diameter(tmp_path):
    root = write_visium_dir(tmp_path / "outs", image=False)
    (root / "spatial" / "scalefactors_json.json").unlink()
    s = read_sample("visium", input=root)
    assert s.image is None
    assert s.pixel_size_um == pytest.approx(UM_PER_PX, rel=0.01) and s.pixel_size_source == "estimated"


def test_lowres_fallback(tmp_path):
    root = write_visium_dir(tmp_path / "outs", image=False)
    Image.new("RGB", (100, 90)).save(root / "spatial" / "tissue_lowres_image.png")
    s = read_visium(root)
    assert s.image.path.name == "tissue_lowres_image.png" and s.image.scale == HIRES_SCALE / 4


def test_legacy_cellranger2_layout(tmp_path):
    counts = np.array([[1, 0, 2], [0, 3, 0]])
    with h5py.File(tmp_path / "m.h5", "w") as f:
        m = sp.csc_matrix(counts.T)
        g = f.create_group("GRCh38")
        for key, value in (
            ("data", m.data),
            ("indices", m.indices),
            ("indptr", m.indptr),
            ("shape", m.shape),
        ):
            g[key] = np.asarray(value)
        g["barcodes"] = np.array([b"A-1", b"B-1"])
        g["gene_names"] = np.array([b"X", b"Y", b"Z"])
        g["genes"] = np.array([b"E1", b"E2", b"E3"])
    a = read_10x_h5(tmp_path / "m.h5")
    assert list(a.obs_names) == ["A-1", "B-1"] and list(a.var_names) == ["X", "Y", "Z"]
    np.testing.assert_array_equal(a.X.toarray(), counts)


# --- errors -----------------------------------------------------------------------------------------------


def test_missing_files(tmp_path):
    with pytest.raises(InputFileError, match="Space Ranger output folder not found"):
        read_visium(tmp_path / "nope")
    root = write_visium_dir(tmp_path / "outs")
    (root / "filtered_feature_bc_matrix.h5").rename(root / "raw.h5")
    with pytest.raises(
        InputFileError, match=r"filtered_feature_bc_matrix\.h5: 10x feature-barcode matrix not found"
    ):
        read_visium(root)
    (root / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(InputFileError, match=r"no spatial/tissue_positions\.csv"):
        read_visium(root, counts_file="raw.h5")


def test_truncated_matrix(tmp_path):
    root = write_visium_dir(tmp_path / "outs")
    m = root / "filtered_feature_bc_matrix.h5"
    data = m.read_bytes()
    m.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputFileError, match=r"filtered_feature_bc_matrix\.h5: cannot read 10x HDF5 matrix"):
        read_visium(root)


def test_not_a_10x_matrix(tmp_path):
    root = write_visium_dir(tmp_path / "outs")
    with h5py.File(root / "filtered_feature_bc_matrix.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(InputFileError, match="not a 10x feature-barcode matrix"):
        read_visium(root)


def test_image_smaller_than_coordinates(tmp_path):
    root = write_visium_dir(tmp_path / "outs")
    Image.new("RGB", (100, 100)).save(root / "spatial" / "tissue_hires_image.png")
    with pytest.raises(InputFileError, match=r"tissue_hires_image\.png: image is 400 x 400 .* outside it"):
        read_visium(root)


def test_no_barcode_in_common(tmp_path):
    root = write_visium_dir(tmp_path / "outs")
    pos_path = root / "spatial" / "tissue_positions.csv"
    pos = pd.read_csv(pos_path)
    pos["barcode"] = "X" + pos["barcode"]
    pos.to_csv(pos_path, index=False)
    with pytest.raises(InputFileError, match=r"filtered_feature_bc_matrix\.h5: no in-tissue barcode"):
        read_visium(root)


def test_duplicated_barcodes_and_bad_positions(tmp_path):
    root = write_visium_dir(tmp_path / "outs")
    pos_path = root / "spatial" / "tissue_positions.csv"
    pos = pd.read_csv(pos_path)
    pd.concat([pos, pos.iloc[3:4]]).to_csv(pos_path, index=False)
    with pytest.raises(InputFileError, match=r"tissue_positions\.csv: duplicated barcodes: \['BC003-1'\]"):
        read_visium(root)
    pos.drop(columns=["array_col"]).to_csv(pos_path, index=False)
    with pytest.raises(InputFileError, match=r"lack columns \['array_col'\]"):
        read_visium(root)


def test_negative_counts(tmp_path):
    root = write_visium_dir(tmp_path / "outs")
    counts = -np.ones((3, 3), dtype=int)
    write_10x_h5(
        root / "filtered_feature_bc_matrix.h5", counts, ["BC001-1", "BC002-1", "BC003-1"], FEATURES[:3]
    )
    with pytest.raises(InputFileError, match="counts contain negative values"):
        read_visium(root)


# --- real data: squidpy's visium_tiny ---------------------------------------------------------------------


def _visium_tiny() -> Path:
    root = SHARED_DATA / "visium_tiny"
    if not root.is_dir():
        pytest.skip(f"visium_tiny absent at {root} (real-data tests need ../shared/data)")
    return root


@pytest.mark.realdata
def test_visium_tiny():
    s = read_visium(_visium_tiny())
    assert (s.n_spots, s.counts.n_vars) == (100, 100)
    assert s.image.path.name == "tissue_hires_image.png" and s.image.scale == pytest.approx(0.150015)
    # 65 um / spot_diameter_fullres (89.43 px); the hexagonal grid fit agrees (0.725 um/px)
    assert s.pixel_size_um == pytest.approx(65.0 / 89.42751063343188)
    assert s.coords[:, 0].max() < s.image.full_res_size[0]


@pytest.mark.realdata
def test_visium_tiny_with_header(tmp_path):
    root = tmp_path / "outs"
    shutil.copytree(_visium_tiny(), root)
    old = root / "spatial" / "tissue_positions_list.csv"
    pos = pd.read_csv(old, header=None, names=["barcode", *POSITION_COLUMNS])
    pos.to_csv(root / "spatial" / "tissue_positions.csv", index=False)
    old.unlink()
    s = read_visium(root)
    ref = read_visium(_visium_tiny())
    assert s.source["positions"].endswith("tissue_positions.csv")
    np.testing.assert_array_equal(s.coords, ref.coords)
    assert list(s.counts.obs_names) == list(ref.counts.obs_names)
    np.testing.assert_array_equal(s.counts.obsm[SPATIAL_KEY], ref.counts.obsm[SPATIAL_KEY])
