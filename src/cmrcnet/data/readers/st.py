"""Reader for legacy Spatial Transcriptomics (ST, Stahl et al. 2016) data as published for her2st and similar sets.

Layout read by `read_st_dir` (her2st, Andersson et al. 2021):

    <input>/counts/<id>.tsv.gz        spots x genes, raw UMI counts; first (unnamed) column is the spot id "XxY"
    <input>/spots/<id>_selection.tsv  x  y  new_x  new_y  pixel_x  pixel_y  selected
    <input>/images/<id>.jpg           H&E image (optional: expression-only sections have none)
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cmrcnet.constants import SPATIAL_KEY, SPOT_PITCH_UM
from cmrcnet.data.image import IMAGE_SUFFIXES
from cmrcnet.data.pixel_size import resolve_pixel_size
from cmrcnet.data.sample import Sample, assemble_sample, finalize_counts
from cmrcnet.errors import InputFileError, require_dir, require_file

logger = logging.getLogger(__name__)

ARRAY_X_KEY = "array_x"  # obs: ST array column index (the "x" of the spot id "XxY")
ARRAY_Y_KEY = "array_y"  # obs: ST array row index
_SPOT_ID = re.compile(r"^\d+x\d+$")
_SELECTION_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def read_st(
    *,
    counts: str | Path,
    spots: str | Path,
    image: str | Path | None = None,
    sample_id: str,
    patient_id: str | None = None,
    pixel_size_um: float | None = None,
) -> Sample:
    """Read one ST section from a counts table, a spot selection table and (optionally) its H&E image.

    Args:
        counts: tab-separated spots x genes raw counts (.tsv or .tsv.gz); first column the spot id "XxY".
        spots: tab-separated spot selection with columns x, y, pixel_x, pixel_y (and optionally selected).
        image: the full-resolution H&E image; None for an expression-only section.
        sample_id: section id.
        patient_id: patient id; defaults to `sample_id`.
        pixel_size_um: micrometres per pixel; estimated from the 200 um spot grid when None.

    Returns:
        A Sample whose spots are those present in both tables (inner join on the spot id), with
        `obs["array_x"]`, `obs["array_y"]` and `obsm["spatial"]` = (pixel_x, pixel_y).
    """
    counts = require_file(counts, "ST counts table")
    spots = require_file(spots, "ST spot selection table")
    image = None if image is None else require_file(image, "H&E image")
    patient_id = sample_id if patient_id is None else patient_id

    table = _read_counts_table(counts)  # (n_spots, n_genes)
    selection = _read_selection(spots)
    common = table.index.intersection(selection.index, sort=False)
    if len(common) == 0:
        raise InputFileError(
            f"no spot id in common with {spots} (counts ids look like {table.index[:3].tolist()}, "
            f"selection ids like {selection.index[:3].tolist()})",
            path=counts,
        )
    n_counts_only = len(table) - len(common)
    n_selection_only = len(selection) - len(common)
    if n_counts_only or n_selection_only:
        logger.warning(
            "%s: kept %d spots present in both tables; dropped %d of %d counts rows without a selected spot "
            "and %d of %d selected spots without counts",
            sample_id,
            len(common),
            n_counts_only,
            len(table),
            n_selection_only,
            len(selection),
        )
    table = table.loc[common]
    selection = selection.loc[common]

    adata = ad.AnnData(
        X=sp.csr_matrix(table.to_numpy(dtype=np.float32)),  # (n_spots, n_genes)
        obs=pd.DataFrame(
            {ARRAY_X_KEY: selection["x"].to_numpy(), ARRAY_Y_KEY: selection["y"].to_numpy()},
            index=pd.Index(common.astype(str), name=None),
        ),
        var=pd.DataFrame(index=pd.Index(table.columns.astype(str), name=None)),
    )
    # pixel_x is the image column and pixel_y the row: already (x, y)
    adata.obsm[SPATIAL_KEY] = selection[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)  # (n_spots, 2)
    adata = finalize_counts(adata, sample_id=sample_id, patient_id=patient_id, path=counts)

    um, source = resolve_pixel_size(
        metadata_um=None,
        user_um=pixel_size_um,
        coords_px=adata.obsm[SPATIAL_KEY],
        pitch_um=SPOT_PITCH_UM["st"],
        array_coords=adata.obs[[ARRAY_X_KEY, ARRAY_Y_KEY]].to_numpy(dtype=np.float64),
        grid="square",
        path=spots,
    )
    return assemble_sample(
        adata,
        sample_id=sample_id,
        patient_id=patient_id,
        technology="st",
        pixel_size=(um, source),
        source={"format": "st", "counts": str(counts), "spots": str(spots)},
        image_path=image,
        dropped={"no counts row": n_selection_only, "no selected spot": n_counts_only},
        detail=", " + ("no image" if image is None else image.name),
    )


def read_st_dir(
    input_dir: str | Path,
    *,
    sample_id: str,
    patient_id: str | None = None,
    pixel_size_um: float | None = None,
    image: str | Path | None = None,
) -> Sample:
    """Read section `sample_id` from a her2st-style folder (counts/, spots/, images/); see the module docstring.

    The image is `image` when given, else `images/<id>.<jpg|jpeg|png|tif|tiff>`, else none (expression only).
    """
    root = require_dir(input_dir, "ST data folder")
    counts = _first_existing(root / "counts", [f"{sample_id}.tsv.gz", f"{sample_id}.tsv"])
    if counts is None:
        raise InputFileError(
            f"no counts table for section {sample_id!r} (expected counts/{sample_id}.tsv.gz or .tsv)",
            path=root,
        )
    spots = _first_existing(root / "spots", [f"{sample_id}_selection.tsv", f"{sample_id}_selection.tsv.gz"])
    if spots is None:
        raise InputFileError(
            f"no spot selection for section {sample_id!r} (expected spots/{sample_id}_selection.tsv)",
            path=root,
        )
    if image is None:
        image = _first_existing(
            root / "images",
            [f"{sample_id}{s}" for s in IMAGE_SUFFIXES + tuple(x.upper() for x in IMAGE_SUFFIXES)],
        )
        if image is None:
            logger.info("%s: no image under %s; reading expression only", sample_id, root / "images")
    return read_st(
        counts=counts,
        spots=spots,
        image=image,
        sample_id=sample_id,
        patient_id=patient_id,
        pixel_size_um=pixel_size_um,
    )


def _first_existing(folder: Path, names: list[str]) -> Path | None:
    for name in names:
        p = folder / name
        if p.is_file():
            return p
    return None


def _read_counts_table(path: Path) -> pd.DataFrame:
    """Spots x genes numeric table indexed by spot id; clear errors for malformed files."""
    try:
        # pandas' C parser infers integer columns faster than it converts to an explicit float dtype
        table = pd.read_csv(path, sep="\t", index_col=0, engine="c")
    except pd.errors.EmptyDataError as exc:
        raise InputFileError("counts table is empty", path=path) from exc
    except Exception as exc:  # truncated gzip (EOFError, BadGzipFile), ragged rows (ParserError), ...
        raise InputFileError(f"cannot parse counts table ({type(exc).__name__}: {exc})", path=path) from exc
    if table.shape[1] == 0:
        raise InputFileError("counts table has no gene columns (is it tab-separated?)", path=path)
    table.index = table.index.astype(str)
    table.columns = table.columns.astype(str)
    # Some ST releases store genes x spots; the spot ids then sit in the header.
    if not _looks_like_spot_ids(table.index) and _looks_like_spot_ids(table.columns):
        logger.info("%s: spot ids are in the header; reading the table as genes x spots", path)
        table = table.T
    bad = [c for c, t in table.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if bad:
        col = table[bad[0]]
        example = col[pd.to_numeric(col, errors="coerce").isna() & col.notna()].head(1)
        where = f" (spot {example.index[0]!r}: {example.iloc[0]!r})" if len(example) else ""
        raise InputFileError(
            f"non-numeric counts in {len(bad)} column(s), first {bad[0]!r}{where}; expected a tab-separated "
            "spots x genes table of integer counts",
            path=path,
        )
    if not table.index.is_unique:
        dups = table.index[table.index.duplicated()].unique()[:5].tolist()
        raise InputFileError(f"duplicated spot ids: {dups}", path=path)
    return table


def _looks_like_spot_ids(labels: pd.Index) -> bool:
    head = labels[:50]
    return len(head) > 0 and sum(bool(_SPOT_ID.match(s)) for s in head) >= len(head) / 2


def _read_selection(path: Path) -> pd.DataFrame:
    """Spot selection indexed by the spot id f"{x}x{y}", selected spots only."""
    try:
        sel = pd.read_csv(path, sep="\t")
    except pd.errors.EmptyDataError as exc:
        raise InputFileError("spot selection table is empty", path=path) from exc
    except Exception as exc:
        raise InputFileError(
            f"cannot parse spot selection table ({type(exc).__name__}: {exc})", path=path
        ) from exc
    sel.columns = [str(c).strip() for c in sel.columns]
    missing = [c for c in _SELECTION_COLUMNS if c not in sel.columns]
    if missing:
        raise InputFileError(
            f"spot selection table lacks columns {missing}; found {list(sel.columns)[:10]} "
            "(expected tab-separated x, y, pixel_x, pixel_y[, selected])",
            path=path,
        )
    for c in (*_SELECTION_COLUMNS, *(("selected",) if "selected" in sel.columns else ())):
        values = pd.to_numeric(sel[c], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=np.float64))  # missing, text, inf
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = sel[c].iloc[row]
            shown = "empty" if pd.isna(value) else repr(str(value))
            raise InputFileError(
                f"column {c!r} has a missing, non-numeric or infinite value in data row {row + 1}: {shown}",
                path=path,
            )
        sel[c] = values
    if "selected" in sel.columns:
        n_before = len(sel)
        sel = sel[sel["selected"] == 1]
        if len(sel) < n_before:
            logger.info("%s: kept %d of %d rows with selected == 1", path, len(sel), n_before)
    for c in ("x", "y"):
        if not np.allclose(sel[c], np.round(sel[c])):
            raise InputFileError(f"array coordinate column {c!r} must hold integers", path=path)
        sel[c] = np.round(sel[c]).astype(np.int64)
    sel.index = pd.Index([f"{x}x{y}" for x, y in zip(sel["x"], sel["y"], strict=True)])
    if not sel.index.is_unique:
        dups = sel.index[sel.index.duplicated()].unique()[:5].tolist()
        raise InputFileError(f"duplicated spot ids (x, y): {dups}", path=path)
    return sel
