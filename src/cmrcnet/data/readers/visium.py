"""Reader for a 10x Genomics Visium Space Ranger output folder.

<path>/filtered_feature_bc_matrix.h5       10x HDF5 feature-barcode matrix
<path>/spatial/tissue_positions.csv        Space Ranger >= 2.0 (header row)
<path>/spatial/tissue_positions_list.csv   Space Ranger 1.x (no header); same six columns:
    barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres
<path>/spatial/scalefactors_json.json      tissue_hires_scalef, tissue_lowres_scalef, spot_diameter_fullres
<path>/spatial/tissue_hires_image.png      downscaled H&E (the full-resolution image is not part of the output)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cmrcnet.constants import SPATIAL_KEY, SPOT_PITCH_UM
from cmrcnet.data.hdf5 import probe_hdf5
from cmrcnet.data.image import SlideImage
from cmrcnet.data.pixel_size import estimate_pixel_size, resolve_pixel_size
from cmrcnet.data.sample import (
    PixelSizeSource,
    Sample,
    assemble_sample,
    check_sparse,
    finalize_counts,
)
from cmrcnet.errors import CmrcnetError, InputFileError, require_dir, require_file

logger = logging.getLogger(__name__)

POSITION_COLUMNS = ("in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
_INTEGER_POSITION_COLUMNS = ("in_tissue", "array_row", "array_col")  # flags and grid indices
GENE_EXPRESSION = (
    "Gene Expression"  # features/feature_type of RNA features (antibody capture etc. are dropped)
)
# Space Ranger's spot_diameter_fullres is "the number of pixels that span the diameter of a theoretical 65 um
# spot" (10x Space Ranger output documentation), not of the 55 um printed spot; checked on squidpy's test
# folder against the 100 um spot grid (65 / 89.43 = 0.727 um/px, grid fit 0.725 um/px).
SPACERANGER_SPOT_DIAMETER_UM = 65.0
# A spot-diameter estimate and a grid estimate further apart than this suggest a broken scalefactors file.
_ESTIMATES_DISAGREE_REL = 0.05


def read_visium(
    path: str | Path,
    *,
    image: str | Path | None = None,
    sample_id: str | None = None,
    patient_id: str | None = None,
    pixel_size_um: float | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
) -> Sample:
    """Read one Visium capture area from a Space Ranger output folder.

    Args:
        path: the Space Ranger `outs/` folder (holding the matrix and `spatial/`).
        image: the full-resolution H&E image given to Space Ranger; when None the hires (else lowres) PNG in
            `spatial/` is used with its scale factor.
        sample_id: defaults to the folder name.
        patient_id: defaults to the sample id.
        pixel_size_um: micrometres per full-resolution pixel; estimated when None (see below).
        counts_file: matrix file name inside `path` (e.g. "raw_feature_bc_matrix.h5").

    Returns:
        A Sample of in-tissue barcodes present in the matrix, with `obs` columns in_tissue, array_row and
        array_col and `obsm["spatial"]` = (pxl_col_in_fullres, pxl_row_in_fullres) i.e. (x, y).

    Pixel size: the user's value; else 65 um / spot_diameter_fullres from the scale factors; else a fit of the
    100 um hexagonal spot grid. Plain Space Ranger output records no pixel size, so the source is "estimated".
    """
    root = require_dir(path, "Space Ranger output folder")
    sample_id = root.name if sample_id is None else sample_id
    patient_id = sample_id if patient_id is None else patient_id
    matrix_path = require_file(root / counts_file, "10x feature-barcode matrix")
    positions_path = _positions_file(root)
    scalefactors_path = root / "spatial" / "scalefactors_json.json"
    scalefactors = _read_scalefactors(scalefactors_path) if scalefactors_path.is_file() else {}
    if not scalefactors:
        logger.info("%s: no %s", sample_id, scalefactors_path)

    adata = read_10x_h5(matrix_path)
    positions = read_tissue_positions(positions_path)

    in_tissue = positions[positions["in_tissue"] == 1]
    in_matrix = adata.obs_names.isin(in_tissue.index)
    n_not_in_tissue = int((~in_matrix).sum())
    n_no_counts = int((~in_tissue.index.isin(adata.obs_names)).sum())
    if not in_matrix.any():
        raise InputFileError(
            f"no in-tissue barcode of {positions_path} is in the matrix (matrix barcodes look like "
            f"{adata.obs_names[:3].tolist()}, positions like {in_tissue.index[:3].tolist()})",
            path=matrix_path,
        )
    if n_not_in_tissue:
        # expected for raw_feature_bc_matrix.h5, which holds every barcode of the slide
        logger.info("%s: dropped %d matrix barcodes not under tissue", sample_id, n_not_in_tissue)
    if n_no_counts:
        logger.warning(
            "%s: %d in-tissue barcodes have no column in %s", sample_id, n_no_counts, matrix_path.name
        )
    adata = adata[in_matrix].copy()
    pos = in_tissue.loc[adata.obs_names]
    adata.obs = pd.DataFrame(
        {c: pos[c].to_numpy(dtype=np.int64) for c in ("in_tissue", "array_row", "array_col")},
        index=adata.obs_names,
    )
    # Space Ranger names the image row "pxl_row" and column "pxl_col"; spatial is (x = column, y = row)
    adata.obsm[SPATIAL_KEY] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    adata = finalize_counts(adata, sample_id=sample_id, patient_id=patient_id, path=matrix_path)

    slide, image_path = _choose_image(root, image=image, scalefactors=scalefactors, sample_id=sample_id)
    um, source = _pixel_size(
        adata, user_um=pixel_size_um, scalefactors=scalefactors, path=positions_path, sample_id=sample_id
    )
    provenance = {"format": "visium", "counts": str(matrix_path), "positions": str(positions_path)}
    if scalefactors:
        provenance["scalefactors"] = str(scalefactors_path)
    return assemble_sample(
        adata,
        sample_id=sample_id,
        patient_id=patient_id,
        technology="visium",
        pixel_size=(um, source),
        source=provenance,
        image_path=image_path,
        image=slide,
        dropped={"not under tissue": n_not_in_tissue, "no counts": n_no_counts},
    )


def read_10x_h5(path: str | Path) -> ad.AnnData:
    """Barcodes x genes AnnData (CSR float32) from a 10x HDF5 matrix, "Gene Expression" features only.

    Supports the current layout (group "matrix" with features/name, id, feature_type; Cell Ranger >= 3.0 and
    every Space Ranger version) and the legacy one (one group per genome with genes and gene_names; Cell
    Ranger 2).
    """
    path = require_file(path, "10x feature-barcode matrix")
    probe_hdf5(path, "10x feature-barcode matrix")
    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                g = f["matrix"]
                names = _strings(g["features/name"])
                ids = _strings(g["features/id"])
                types = _strings(g["features/feature_type"]) if "feature_type" in g["features"] else None
            else:
                groups = [k for k in f if isinstance(f[k], h5py.Group)]
                if len(groups) != 1:
                    raise InputFileError(
                        f"not a 10x feature-barcode matrix: no 'matrix' group (top-level keys {list(f)[:5]})",
                        path=path,
                    )
                g = f[groups[0]]  # legacy layout: the group is named after the genome
                names = _strings(g["gene_names"])
                ids = _strings(g["genes"])
                types = None
            barcodes = _strings(g["barcodes"])
            n_features, n_barcodes = (int(v) for v in g["shape"][:2])
            data = g["data"][:]
            indices = g["indices"][:]
            indptr = g["indptr"][:]
    except InputFileError:
        raise
    except KeyError as exc:
        raise InputFileError(f"not a 10x feature-barcode matrix: missing dataset ({exc})", path=path) from exc
    except Exception as exc:  # truncated or corrupt HDF5 raises OSError; bad shapes raise ValueError
        raise InputFileError(f"cannot read 10x HDF5 matrix ({type(exc).__name__}: {exc})", path=path) from exc
    if len(barcodes) != n_barcodes or len(names) != n_features or len(indptr) != n_barcodes + 1:
        raise InputFileError(
            f"inconsistent 10x matrix: shape ({n_features}, {n_barcodes}), {len(names)} features, "
            f"{len(barcodes)} barcodes, {len(indptr)} indptr entries",
            path=path,
        )
    try:
        # 10x stores genes x barcodes in CSC, whose arrays read unchanged as barcodes x genes in CSR
        x = sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(n_barcodes, n_features))
    except (ValueError, TypeError) as exc:
        raise InputFileError(f"corrupt 10x matrix arrays ({exc})", path=path) from exc
    check_sparse(x, path=path, what="10x matrix")
    var = pd.DataFrame({"gene_ids": ids}, index=pd.Index(names, name=None))
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=pd.Index(barcodes, name=None)), var=var)
    if types is not None:
        keep = np.asarray(types) == GENE_EXPRESSION
        if not keep.all():
            logger.info(
                "%s: kept %d of %d features of type %r", path, int(keep.sum()), len(keep), GENE_EXPRESSION
            )
            adata = adata[:, keep].copy()
    return adata


def read_tissue_positions(path: str | Path) -> pd.DataFrame:
    """Tissue positions indexed by barcode with columns `POSITION_COLUMNS`, from either Space Ranger layout."""
    path = require_file(path, "Visium tissue positions")
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
        # Space Ranger >= 2.0 writes a header row; 1.x (tissue_positions_list.csv) does not
        has_header = first.split(",")[0].strip().lower() == "barcode"
        pos = pd.read_csv(
            path,
            header=0 if has_header else None,
            names=None if has_header else ["barcode", *POSITION_COLUMNS],
            index_col=0,
        )
    except pd.errors.EmptyDataError as exc:
        raise InputFileError("tissue positions file is empty", path=path) from exc
    except Exception as exc:
        raise InputFileError(
            f"cannot parse tissue positions ({type(exc).__name__}: {exc})", path=path
        ) from exc
    missing = [c for c in POSITION_COLUMNS if c not in pos.columns]
    if missing:
        raise InputFileError(
            f"tissue positions lack columns {missing}; found {list(pos.columns)} (expected barcode, "
            + ", ".join(POSITION_COLUMNS)
            + ")",
            path=path,
        )
    for c in POSITION_COLUMNS:
        values = pd.to_numeric(pos[c], errors="coerce")
        if not np.isfinite(values.to_numpy(dtype=np.float64)).all():
            raise InputFileError(f"column {c!r} has missing, non-numeric or infinite values", path=path)
        if c in _INTEGER_POSITION_COLUMNS and not (values == np.round(values)).all():
            raise InputFileError(f"column {c!r} must hold integers", path=path)
        pos[c] = values
    pos.index = pos.index.astype(str)
    if not pos.index.is_unique:
        dups = pos.index[pos.index.duplicated()].unique()[:5].tolist()
        raise InputFileError(f"duplicated barcodes: {dups}", path=path)
    return pos[list(POSITION_COLUMNS)]


def _positions_file(root: Path) -> Path:
    for name in ("tissue_positions.csv", "tissue_positions_list.csv"):
        p = root / "spatial" / name
        if p.is_file():
            return p
    raise InputFileError(
        "no spatial/tissue_positions.csv (Space Ranger >= 2.0) or spatial/tissue_positions_list.csv",
        path=root,
    )


def _read_scalefactors(path: Path) -> dict[str, float]:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except Exception as exc:
        raise InputFileError(
            f"cannot parse scale factors JSON ({type(exc).__name__}: {exc})", path=path
        ) from exc
    if not isinstance(raw, dict):
        raise InputFileError("scale factors JSON is not an object", path=path)
    out: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _choose_image(
    root: Path, *, image: str | Path | None, scalefactors: dict[str, float], sample_id: str
) -> tuple[SlideImage | None, Path | None]:
    if image is not None:
        image = require_file(image, "H&E image")
        logger.info("%s: using the full-resolution image %s", sample_id, image)
        return SlideImage(image, scale=1.0), image
    for kind in ("hires", "lowres"):
        p = root / "spatial" / f"tissue_{kind}_image.png"
        key = f"tissue_{kind}_scalef"
        if not p.is_file():
            continue
        scale = scalefactors.get(key)
        if scale is None or not scale > 0:
            raise InputFileError(
                f"{p.name} is present but {key} is missing from scalefactors_json.json", path=p
            )
        logger.info("%s: no full-resolution image given; using %s (scale %.6g)", sample_id, p.name, scale)
        return SlideImage(p, scale=scale), p
    logger.warning("%s: no image given and none in %s; reading expression only", sample_id, root / "spatial")
    return None, None


def _pixel_size(
    adata: ad.AnnData,
    *,
    user_um: float | None,
    scalefactors: dict[str, float],
    path: Path,
    sample_id: str,
) -> tuple[float, PixelSizeSource]:
    coords = adata.obsm[SPATIAL_KEY]
    array_coords = adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.float64)
    from_diameter = None
    diameter = scalefactors.get("spot_diameter_fullres")
    if user_um is None and diameter is not None and diameter > 0:
        from_diameter = SPACERANGER_SPOT_DIAMETER_UM / diameter
        logger.info(
            "%s: pixel size %.4f um/px = %.0f um / spot_diameter_fullres (%.2f px)",
            sample_id,
            from_diameter,
            SPACERANGER_SPOT_DIAMETER_UM,
            diameter,
        )
        if adata.n_obs >= 10:
            try:
                from_grid = estimate_pixel_size(
                    coords, pitch_um=SPOT_PITCH_UM["visium"], array_coords=array_coords, grid="hex"
                )
            except CmrcnetError:
                from_grid = None
            if from_grid is not None and abs(from_grid - from_diameter) > _ESTIMATES_DISAGREE_REL * from_grid:
                logger.warning(
                    "%s: pixel size from spot_diameter_fullres (%.4f um/px) and from the spot grid (%.4f um/px) "
                    "differ; using the former. Pass pixel_size_um= if you know the true value",
                    sample_id,
                    from_diameter,
                    from_grid,
                )
    return resolve_pixel_size(
        metadata_um=None,
        user_um=user_um,
        coords_px=coords,
        pitch_um=SPOT_PITCH_UM["visium"],
        array_coords=array_coords,
        grid="hex",
        path=path,
        estimate_um=from_diameter,
    )


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in dataset[:]]
