"""The in-memory sample every reader returns, and the checks every reader applies."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cmrcnet.constants import PATIENT_KEY, SAMPLE_KEY, SPATIAL_KEY
from cmrcnet.data.image import SlideImage
from cmrcnet.errors import InputFileError

logger = logging.getLogger(__name__)

PixelSizeSource = Literal["metadata", "user", "estimated"]
Technology = Literal["st", "visium", "hest", "unknown", "synthetic"]


@dataclass
class Sample:
    """One slide/section with measured expression, as every reader returns it.

    Attributes:
        sample_id: slide/section id (used as file name in a prepared dataset).
        counts: spots x genes AnnData of raw integer counts; `obs_names` are spot barcodes; `obsm["spatial"]`
            holds spot centres (x = column, y = row) in full-resolution pixels; `obs` has sample and patient ids.
        image: the H&E image, or None for an expression-only sample.
        pixel_size_um: micrometres per full-resolution pixel.
        pixel_size_source: where `pixel_size_um` came from ("metadata", "user" or "estimated").
        patient_id: patient (donor) id; defaults to the sample id when unknown.
        technology: "st", "visium", "hest", "synthetic" or "unknown"; decides the spot pitch used for estimates.
        source: provenance (the files read), recorded in the prepared metadata.
        dropped: spots the reader left out, by reason (e.g. {"no counts row": 2}), for the prepare summary.
    """

    sample_id: str
    counts: ad.AnnData
    image: SlideImage | None
    pixel_size_um: float
    pixel_size_source: PixelSizeSource
    patient_id: str
    technology: Technology = "unknown"
    source: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return self.counts.n_obs

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) float spot centres in full-resolution pixels, columns (x, y)."""
        return np.asarray(self.counts.obsm[SPATIAL_KEY], dtype=np.float64)


def finalize_counts(adata: ad.AnnData, *, sample_id: str, patient_id: str, path: str | Path) -> ad.AnnData:
    """Validate raw counts and coordinates and stamp sample/patient ids; raise InputFileError naming `path`.

    Checks: at least one spot and gene, unique spot ids and gene names (duplicated gene symbols are made unique
    as anndata does, with a suffix), finite non-negative counts, finite (N, 2) coordinates.
    """
    if adata.n_obs == 0:
        raise InputFileError("no spots", path=path)
    if adata.n_vars == 0:
        raise InputFileError("no genes", path=path)
    if not adata.obs_names.is_unique:
        dups = adata.obs_names[adata.obs_names.duplicated()].unique()[:5].tolist()
        raise InputFileError(f"duplicated spot ids: {dups}", path=path)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    x = adata.X
    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size and not np.all(np.isfinite(data)):
        raise InputFileError("counts contain NaN or infinite values", path=path)
    if data.size and data.min() < 0:
        raise InputFileError("counts contain negative values", path=path)
    if SPATIAL_KEY not in adata.obsm:
        raise InputFileError(f'no spot coordinates (obsm["{SPATIAL_KEY}"])', path=path)
    coords = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2 or coords.shape[0] != adata.n_obs:
        raise InputFileError(f"spot coordinates must be (N, 2), got {coords.shape}", path=path)
    if not np.all(np.isfinite(coords[:, :2])):
        raise InputFileError("spot coordinates contain NaN or infinite values", path=path)
    adata.obsm[SPATIAL_KEY] = coords[:, :2]
    if not sp.issparse(adata.X):
        adata.X = sp.csr_matrix(np.asarray(adata.X, dtype=np.float32))
    else:
        adata.X = adata.X.tocsr().astype(np.float32)
    adata.obs[SAMPLE_KEY] = sample_id
    adata.obs[PATIENT_KEY] = patient_id
    return adata


def check_sparse(x: object, *, path: str | Path, what: str = "count matrix") -> None:
    """Raise InputFileError if sparse `x` has inconsistent index arrays (a corrupt file).

    scipy trusts the index arrays it is given: out-of-range indices in a CSR/CSC matrix read from a damaged file
    make later slicing write outside its buffers and crash the process. Dense arrays pass unchecked.
    """
    if not sp.issparse(x):
        return
    try:
        x.check_format(full_check=True)
    except (ValueError, TypeError, IndexError) as exc:
        raise InputFileError(f"corrupt sparse {what} ({exc})", path=path) from exc


def check_coords_inside_image(sample: Sample, *, path: str | Path, tolerance_px: float = 1.0) -> None:
    """Raise if spot centres fall outside the image (usually a wrong image or wrong scale factor)."""
    if sample.image is None:
        return
    w, h = sample.image.full_res_size
    xy = sample.coords
    outside = (xy[:, 0] < -tolerance_px) | (xy[:, 1] < -tolerance_px)
    outside |= (xy[:, 0] > w + tolerance_px) | (xy[:, 1] > h + tolerance_px)
    if outside.any():
        raise InputFileError(
            f"image is {w:.0f} x {h:.0f} full-resolution px but {int(outside.sum())} of {len(xy)} spot centres "
            f"lie outside it (max x {xy[:, 0].max():.0f}, max y {xy[:, 1].max():.0f}); wrong image or scale factor?",
            path=path,
        )


def assemble_sample(
    counts: ad.AnnData,
    *,
    sample_id: str,
    patient_id: str,
    technology: Technology,
    pixel_size: tuple[float, PixelSizeSource],
    source: dict[str, str],
    image_path: str | Path | None,
    image: SlideImage | None = None,
    dropped: dict[str, int] | None = None,
    detail: str = "",
) -> Sample:
    """The common tail of every reader: the Sample, its image checked against the spots, one log line.

    Parameters
    ----------
    counts
        The finalised counts (`finalize_counts`), with obsm["spatial"] in full-resolution pixels.
    sample_id, patient_id, technology
        As in `Sample`.
    pixel_size
        (micrometres per full-resolution pixel, where that came from), from `resolve_pixel_size`.
    source
        The files read (provenance); the image path is added to it.
    image_path
        The H&E image file, or None for an expression-only sample.
    image
        The opened image when the reader needs its own scale; default: `image_path` at scale 1.
    dropped
        Spots the reader left out, by reason.
    detail
        Text the log line adds after the spot and gene counts (e.g. ", patient 'A'").

    Returns
    -------
    Sample
        The sample; a spot centre outside the image raises InputFileError.
    """
    um, px_source = pixel_size
    if image_path is not None:
        source = {**source, "image": str(image_path)}
        image = image if image is not None else SlideImage(image_path, scale=1.0)
    sample = Sample(
        sample_id=sample_id,
        counts=counts,
        image=image,
        pixel_size_um=um,
        pixel_size_source=px_source,
        patient_id=patient_id,
        technology=technology,
        source=source,
        dropped=dict(dropped or {}),
    )
    if image_path is not None:
        check_coords_inside_image(sample, path=image_path)
    logger.info(
        "%s: %d spots x %d genes%s, %.4f um/px (%s)",
        sample_id,
        sample.n_spots,
        counts.n_vars,
        detail,
        um,
        px_source,
    )
    return sample
