"""Reader for a generic AnnData (.h5ad) spatial sample plus an optional H&E image.

Expected: raw counts (in X, layers["counts"] or raw), `obsm["spatial"]` = spot centres (x, y) in
full-resolution pixels of the image. Scanpy/squidpy Visium objects keep Space Ranger's scale factors in
`uns["spatial"][<library>]["scalefactors"]`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import get_args

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cmrcnet.constants import CMRCNET_UNS, SPATIAL_KEY, SPOT_PITCH_UM
from cmrcnet.data.hdf5 import probe_hdf5
from cmrcnet.data.pixel_size import GridKind, resolve_pixel_size
from cmrcnet.data.readers.visium import SPACERANGER_SPOT_DIAMETER_UM
from cmrcnet.data.sample import (
    Sample,
    Technology,
    assemble_sample,
    check_sparse,
    finalize_counts,
)
from cmrcnet.errors import ConfigError, InputFileError, require_file

logger = logging.getLogger(__name__)

COUNTS_LAYER = "counts"  # layers: raw counts kept next to normalised X (scanpy convention)
# Pixel-size keys a writer may leave in uns (this package, HEST, ad-hoc pipelines), in order of preference.
_UNS_PIXEL_SIZE_KEYS = ("pixel_size_um", "pixel_size_um_embedded", "pixel_size_um_estimated")
# Array (grid) coordinates and grid kind per technology, when obs holds them.
_ARRAY_COLUMNS: dict[str, tuple[tuple[str, str], GridKind]] = {
    "visium": (("array_row", "array_col"), "hex"),
    "st": (("array_x", "array_y"), "square"),
}
# Values sampled to decide whether a matrix holds integer counts.
_INTEGER_CHECK_VALUES = 1_000_000


def read_anndata(
    path: str | Path,
    *,
    image: str | Path | None = None,
    sample_id: str | None = None,
    patient_id: str | None = None,
    pixel_size_um: float | None = None,
    technology: Technology = "unknown",
) -> Sample:
    """Read a spatial .h5ad with spot centres in `obsm["spatial"]` (full-resolution pixels of `image`).

    Args:
        path: the .h5ad file.
        image: the full-resolution H&E image; None for an expression-only sample.
        sample_id: defaults to the file name without suffix.
        patient_id: defaults to the sample id.
        pixel_size_um: micrometres per pixel; else from uns metadata, else estimated from the spot grid.
        technology: "st", "visium", ... ; decides the spot pitch for estimates ("unknown" needs a pixel size).

    Returns:
        A Sample holding the raw counts (X if it holds integers, else layers["counts"], else raw).

    Pixel size: the user's value; else a pixel size stored in uns ("metadata"); else, for Visium,
    65 um / uns["spatial"][library]["scalefactors"]["spot_diameter_fullres"]; else a fit of the spot grid
    with the technology's pitch (using obs array coordinates when present).
    """
    if technology not in get_args(Technology):
        raise ConfigError(f"unknown technology {technology!r}; expected one of {list(get_args(Technology))}")
    path = require_file(path, "AnnData file")
    sample_id = path.stem if sample_id is None else sample_id
    patient_id = sample_id if patient_id is None else patient_id
    image = None if image is None else require_file(image, "H&E image")

    src = load_h5ad(path)
    adata = spatial_counts(src, path=path)
    adata = finalize_counts(adata, sample_id=sample_id, patient_id=patient_id, path=path)

    metadata_um = uns_pixel_size(src.uns)
    from_diameter = None
    if pixel_size_um is None and metadata_um is None and technology == "visium":
        diameter = _visium_spot_diameter(src.uns)
        if diameter is not None:
            from_diameter = SPACERANGER_SPOT_DIAMETER_UM / diameter
            logger.info(
                "%s: pixel size %.4f um/px = %.0f um / spot_diameter_fullres (%.2f px) in uns",
                sample_id,
                from_diameter,
                SPACERANGER_SPOT_DIAMETER_UM,
                diameter,
            )
    array_coords, grid = _array_coords(adata, technology)
    um, source = resolve_pixel_size(
        metadata_um=metadata_um,
        user_um=pixel_size_um,
        coords_px=adata.obsm[SPATIAL_KEY],
        pitch_um=SPOT_PITCH_UM.get(technology),
        array_coords=array_coords,
        grid=grid,
        path=path,
        estimate_um=from_diameter,
    )
    if image is None:
        logger.info("%s: no image given; reading expression only", sample_id)
    return assemble_sample(
        adata,
        sample_id=sample_id,
        patient_id=patient_id,
        technology=technology,
        pixel_size=(um, source),
        source={"format": "anndata", "counts": str(path)},
        image_path=image,
    )


def load_h5ad(path: str | Path) -> ad.AnnData:
    """Read a .h5ad into memory; any failure (truncated, not HDF5, not AnnData) becomes an InputFileError."""
    path = require_file(path, "AnnData file")
    probe_hdf5(path, "AnnData file")
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # h5py OSError for truncated files, anndata's own read errors, KeyError, ...
        raise InputFileError(
            f"cannot read AnnData file ({type(exc).__name__}: {_first_line(exc)})", path=path
        ) from exc


def spatial_counts(src: ad.AnnData, *, path: str | Path) -> ad.AnnData:
    """A fresh spots x genes AnnData with the raw counts, `obsm["spatial"]` and grid columns of `src`.

    Raw counts are taken from X when it holds integers, else from layers["counts"], else from
    `raw`; a file that only holds normalised values raises. Only the parts the package needs are copied (no
    uns images).
    """
    if SPATIAL_KEY in src.obsm:
        coords = np.asarray(src.obsm[SPATIAL_KEY], dtype=np.float64)
    elif {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(src.obs.columns):
        # some writers keep Space Ranger's columns in obs and no obsm["spatial"]
        coords = src.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    else:
        raise InputFileError(f'no spot coordinates: obsm["{SPATIAL_KEY}"] is missing', path=path)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise InputFileError(f'obsm["{SPATIAL_KEY}"] must be (N, 2), got {coords.shape}', path=path)

    candidates: list[tuple[str, object, pd.Index]] = [("X", src.X, src.var_names)]
    if COUNTS_LAYER in src.layers:
        candidates.append((f'layers["{COUNTS_LAYER}"]', src.layers[COUNTS_LAYER], src.var_names))
    if src.raw is not None:
        candidates.append(("raw.X", src.raw.X, src.raw.var_names))
    for where, x, _ in candidates:
        if x is not None:
            check_sparse(x, path=path, what=f"matrix in {where}")
    chosen = next(((w, x, v) for w, x, v in candidates if x is not None and _holds_counts(x)), None)
    if chosen is None:
        tried = ", ".join(w for w, _x, _v in candidates)
        raise InputFileError(
            f"no raw counts found (checked {tried}): all hold non-integer (normalised) values. "
            f'Keep the raw integer counts in X, layers["{COUNTS_LAYER}"] or adata.raw',
            path=path,
        )
    where, x, var_names = chosen
    if where != "X":
        logger.info("%s: X is not raw counts; using %s", path, where)
    x = x.tocsr().astype(np.float32) if sp.issparse(x) else sp.csr_matrix(np.asarray(x, dtype=np.float32))
    obs = pd.DataFrame(index=pd.Index(src.obs_names.astype(str), name=None))
    for col in ("in_tissue", "array_row", "array_col", "array_x", "array_y"):
        if col in src.obs.columns:
            obs[col] = src.obs[col].to_numpy()
    out = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(var_names.astype(str), name=None)))
    out.obsm[SPATIAL_KEY] = coords[:, :2]  # (n_spots, 2)
    return out


def uns_pixel_size(uns: dict) -> float | None:
    """A pixel size (um/px) recorded in uns by this package or another writer, or None."""
    scopes = [uns.get(CMRCNET_UNS), uns]
    for scope in scopes:
        if not isinstance(scope, dict):
            continue
        for key in _UNS_PIXEL_SIZE_KEYS:
            value = _as_float(scope.get(key))
            if value is not None and math.isfinite(value):
                return value
    return None


def _visium_spot_diameter(uns: dict) -> float | None:
    libraries = uns.get("spatial")
    if not isinstance(libraries, dict):
        return None
    diameters = {}
    for name, lib in libraries.items():
        factors = lib.get("scalefactors") if isinstance(lib, dict) else None
        d = _as_float(factors.get("spot_diameter_fullres")) if isinstance(factors, dict) else None
        if d is not None and math.isfinite(d) and d > 0:
            diameters[name] = d
    if len(diameters) > 1:
        logger.warning("uns['spatial'] holds %d libraries; using %s", len(diameters), next(iter(diameters)))
    return next(iter(diameters.values()), None)


def _array_coords(adata: ad.AnnData, technology: str) -> tuple[np.ndarray | None, GridKind]:
    spec = _ARRAY_COLUMNS.get(technology)
    if spec is None:
        return None, "auto"
    cols, grid = spec
    if not set(cols) <= set(adata.obs.columns):
        return None, grid
    arr = adata.obs[list(cols)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    return (arr, grid) if np.all(np.isfinite(arr)) else (None, grid)


def _holds_counts(x: object) -> bool:
    """True when the (sampled) finite values are all integers.

    Normalised values (log1p, CPM, z-scores) are non-integer; integer values with a negative are corrupt counts
    rather than normalised ones, and are left for `finalize_counts` to reject with a precise message.
    """
    data = x.data if sp.issparse(x) else np.asarray(x)
    data = np.asarray(data).ravel()
    if data.size > _INTEGER_CHECK_VALUES:
        data = data[:: data.size // _INTEGER_CHECK_VALUES + 1]
    if data.size == 0:
        return True
    if not np.issubdtype(data.dtype, np.number):
        return False
    data = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data
    return bool(np.all(data == np.round(data)))


def _as_float(value: object) -> float | None:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
