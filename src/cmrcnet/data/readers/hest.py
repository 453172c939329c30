"""Reader for a HEST-1k download (Jaume et al. 2024, huggingface.co/datasets/MahmoodLab/hest).

    <root>/st/<id>.h5ad        raw counts; obsm["spatial"] = spot centres (pxl_col, pxl_row) = (x, y) in
                               full-resolution pixels of the WSI
    <root>/wsis/<id>.tif       pyramidal generic TIFF, level 0 = full resolution
    <root>/metadata/<id>.json  pixel_size_um_estimated, pixel_size_um_embedded, patient, dataset_title,
                               st_technology, spot_diameter and inter_spot_dist (um), fullres_px_width/height, ...
    <root>/patches/<id>.h5     img (N, 224, 224, 3) uint8, barcode (N, 1) bytes, coords (N, 2): TOP-LEFT corners
                               in level-0 pixels (HEST's dump_patches stores centre - patch_side // 2), 112 um
                               field of view at 0.5 um/px

The layout and keys were checked against mahmoodlab/HEST (src/hest/HESTData.py: `_read_st`, `read_HESTData`,
`dump_patches`; src/hest/readers.py: obsm["spatial"] built from pxl_col_in_fullres, pxl_row_in_fullres).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import h5py
import numpy as np

from cmrcnet.constants import METADATA_DIR, PATCHES_DIR, SPATIAL_KEY, SPOT_PITCH_UM, ST_DIR
from cmrcnet.data.hdf5 import probe_hdf5
from cmrcnet.data.pixel_size import resolve_pixel_size
from cmrcnet.data.readers.anndata_reader import load_h5ad, spatial_counts
from cmrcnet.data.sample import Sample, assemble_sample, finalize_counts
from cmrcnet.errors import InputFileError, require_dir, require_file

logger = logging.getLogger(__name__)

WSI_DIR = "wsis"
# metadata keys, in order of preference, for the pixel size of the WSI (um/px)
_PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
# HEST's st_technology values -> the pitch used when the pixel size must be estimated
_TECH_PITCH = {"visium": SPOT_PITCH_UM["visium"], "spatial transcriptomics": SPOT_PITCH_UM["st"]}


def read_hest(
    root: str | Path,
    *,
    sample_id: str,
    patient_id: str | None = None,
    pixel_size_um: float | None = None,
) -> Sample:
    """Read HEST-1k sample `sample_id` (e.g. "TENX95") from a HEST download folder; see the module docstring.

    Args:
        root: the folder holding st/, wsis/, metadata/ (and patches/).
        sample_id: the HEST id.
        patient_id: overrides the metadata's patient.
        pixel_size_um: overrides the metadata's pixel size.

    Returns:
        A Sample (technology "hest") whose image is wsis/<id>.tif (None when absent), pixel size from
        metadata `pixel_size_um_estimated` (source "metadata"), and patient id from metadata `patient`
        qualified by `dataset_title` (HEST numbers patients per study: "Patient 1" recurs across studies),
        else the sample id.
    """
    root = require_dir(root, "HEST folder")
    st_path = require_file(root / ST_DIR / f"{sample_id}.h5ad", "HEST expression file")
    meta_path = root / METADATA_DIR / f"{sample_id}.json"
    if meta_path.is_file():
        meta = read_hest_metadata(meta_path)
    elif pixel_size_um is None:
        raise InputFileError(
            "HEST metadata not found (it holds the pixel size); download it or pass pixel_size_um=",
            path=meta_path,
        )
    else:
        logger.warning("%s: no %s; using pixel_size_um=", sample_id, meta_path)
        meta = {}
    wsi_path = root / WSI_DIR / f"{sample_id}.tif"
    if not wsi_path.is_file():
        logger.info("%s: no whole-slide image %s; reading expression only", sample_id, wsi_path)
        wsi_path = None

    if patient_id is None:
        patient_id = _patient(meta, sample_id)
    adata = spatial_counts(load_h5ad(st_path), path=st_path)
    adata = finalize_counts(adata, sample_id=sample_id, patient_id=patient_id, path=st_path)

    metadata_um = next((meta[k] for k in _PIXEL_SIZE_KEYS if _is_number(meta.get(k))), None)
    tech = str(meta.get("st_technology", "")).strip().lower()
    um, source = resolve_pixel_size(
        metadata_um=metadata_um,
        user_um=pixel_size_um,
        coords_px=adata.obsm[SPATIAL_KEY],
        pitch_um=_TECH_PITCH.get(tech),
        array_coords=None,
        path=meta_path,
    )
    provenance = {"format": "hest", "counts": str(st_path)}
    if tech:
        provenance["st_technology"] = tech  # legacy ST gets its own default field of view (prepare.default_fov_um)
    if meta:
        provenance["metadata"] = str(meta_path)
    return assemble_sample(
        adata,
        sample_id=sample_id,
        patient_id=patient_id,
        technology="hest",
        pixel_size=(um, source),
        source=provenance,
        image_path=wsi_path,
        detail=f", patient {patient_id!r}",
    )


def read_hest_metadata(path: str | Path) -> dict:
    """The metadata JSON of one HEST sample as a dict."""
    path = require_file(path, "HEST metadata")
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)  # Python's json accepts the bare NaN that HEST writes for unknown values
    except Exception as exc:
        raise InputFileError(f"cannot parse metadata JSON ({type(exc).__name__}: {exc})", path=path) from exc
    if not isinstance(meta, dict):
        raise InputFileError("metadata JSON is not an object", path=path)
    return meta


def read_hest_patches(root: str | Path, sample_id: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Read HEST's pre-extracted patches for one sample from `<root>/patches/<id>.h5`.

    Returns:
        (img (N, S, S, 3) uint8, barcodes (N,) matching the st h5ad's obs_names, coords (N, 2) int64 of the
        patches' TOP-LEFT corners (x, y) in level-0 WSI pixels; add half the patch side in level-0 pixels to
        get spot centres).
    """
    path = require_file(Path(root) / PATCHES_DIR / f"{sample_id}.h5", "HEST patch file")
    probe_hdf5(path, "HEST patch file")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("img", "barcode", "coords") if k not in f]
            if missing:
                raise InputFileError(f"patch file lacks datasets {missing}; found {list(f)}", path=path)
            img = f["img"][:]
            raw_barcodes = f["barcode"][:]
            coords = f["coords"][:]
    except InputFileError:
        raise
    except Exception as exc:  # truncated or corrupt HDF5
        raise InputFileError(f"cannot read patch file ({type(exc).__name__}: {exc})", path=path) from exc
    n = len(img)
    if img.ndim != 4 or img.shape[-1] != 3:
        raise InputFileError(f"img must be (N, S, S, 3), got {img.shape}", path=path)
    barcodes = [
        b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in np.asarray(raw_barcodes).reshape(-1)
    ]
    coords = np.asarray(coords)
    if len(barcodes) != n or coords.shape != (n, 2):
        raise InputFileError(
            f"inconsistent patch file: img {img.shape}, {len(barcodes)} barcodes, coords {coords.shape}",
            path=path,
        )
    return img.astype(np.uint8, copy=False), barcodes, coords.astype(np.int64)


def _patient(meta: dict, sample_id: str) -> str:
    patient = meta.get("patient")
    if patient is None or (isinstance(patient, float) and math.isnan(patient)) or not str(patient).strip():
        logger.info("%s: no patient in the HEST metadata; using the sample id as patient id", sample_id)
        return sample_id
    dataset = meta.get("dataset_title")
    if isinstance(dataset, str) and dataset.strip():
        return f"{dataset.strip()} / {str(patient).strip()}"
    return str(patient).strip()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
