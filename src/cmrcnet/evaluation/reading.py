"""Reading a prediction (PRED.h5ad, or the AnnData `cmrcnet.predict` returns) for evaluation, with its checks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from cmrcnet.constants import CMRCNET_UNS, SAMPLE_KEY
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.genes import expression_matrix
from cmrcnet.data.hdf5 import probe_hdf5
from cmrcnet.data.sample import check_sparse
from cmrcnet.errors import InputFileError, require_file

logger = logging.getLogger(__name__)

BARCODE_KEY = "barcode"  # obs of PRED.h5ad: spot barcode within its sample


def _plain(value: Any) -> Any:
    """numpy scalars/arrays from an h5ad `uns` -> plain Python (lists, floats, bools, str)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


IN_MEMORY = Path("<prediction in memory>")  # what messages name for a prediction given as an AnnData


def read_prediction(pred_path: str | Path | ad.AnnData) -> tuple[ad.AnnData, dict[str, Any]]:
    """Read and check a PRED.h5ad (or check a prediction AnnData in memory).

    Parameters
    ----------
    pred_path
        The prediction file, or the AnnData itself. Reads obs "sample_id" and "barcode", X and uns["cmrcnet"].

    Returns
    -------
    tuple
        (the prediction, its provenance uns["cmrcnet"] as plain Python with a float "target_sum" and a list
        "train_samples").
    """
    if isinstance(pred_path, ad.AnnData):
        pred, path = pred_path, IN_MEMORY
    else:
        path = require_file(pred_path, "prediction file")
        probe_hdf5(path, "prediction file")
        try:
            pred = ad.read_h5ad(path)
        except Exception as exc:  # h5py/anndata raise OSError, KeyError, ValueError on corrupt files
            raise InputFileError(
                f"cannot read prediction h5ad ({type(exc).__name__}: {exc})", path=path
            ) from exc
    info = pred.uns.get(CMRCNET_UNS)
    if not isinstance(info, dict):
        raise InputFileError(
            f'not a cmrcnet prediction: no uns["{CMRCNET_UNS}"] (write it with `cmrcnet predict`)', path=path
        )
    info = _plain(info)
    for key in (SAMPLE_KEY, BARCODE_KEY):
        if key not in pred.obs:
            raise InputFileError(f'no obs["{key}"] column', path=path)
    if "target_sum" not in info:
        raise InputFileError(f'uns["{CMRCNET_UNS}"] has no "target_sum"', path=path)
    try:
        target_sum = float(info["target_sum"])
    except (TypeError, ValueError) as exc:
        raise InputFileError(f"target_sum is not a number: {info['target_sum']!r}", path=path) from exc
    if not target_sum > 0:
        raise InputFileError(f"target_sum must be positive, got {target_sum}", path=path)
    info["target_sum"] = target_sum
    train = info.get("train_samples", [])
    info["train_samples"] = [str(train)] if isinstance(train, str) else [str(s) for s in train]
    if pred.n_obs == 0 or pred.n_vars == 0:
        raise InputFileError(f"empty prediction ({pred.n_obs} spots x {pred.n_vars} genes)", path=path)
    if not pred.var_names.is_unique:
        raise InputFileError("duplicated gene names in the prediction", path=path)
    check_sparse(pred.X, path=path, what="prediction matrix")
    x = dense(pred.X)
    if not np.isfinite(x).all():
        raise InputFileError(
            f"{int((~np.isfinite(x)).sum())} predicted values are NaN or infinite", path=path
        )
    return pred, info


def dense(x: Any) -> np.ndarray:
    """A dense numpy array from a dense or sparse matrix."""
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def measured_for(
    dataset: PreparedDataset,
    sid: str,
    barcodes: list[str],
    genes: list[str],
    target_sum: float,
    pred_path: Path,
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Measured log1p (N, G) aligned to `barcodes`, the predicted genes missing from the sample, extra info."""
    counts = dataset.read_counts(sid)
    present = pd.Index(counts.obs_names)
    absent = [b for b in barcodes if b not in present]
    if absent:
        raise InputFileError(
            f"{len(absent)} of {len(barcodes)} predicted spots of sample {sid!r} are not in the measured data "
            f"of {dataset.counts_path(sid)} (first: {absent[:5]}); was the prediction made on another version "
            "of this sample?",
            path=pred_path,
        )
    n_measured = int(counts.n_obs)
    counts = counts[barcodes]
    mat, missing = expression_matrix(
        counts, genes, target_sum=target_sum, allow_missing=True, source=dataset.counts_path(sid)
    )
    if missing:
        logger.warning(
            "sample %s: %d predicted genes are not measured and are left out of its metrics: %s",
            sid,
            len(missing),
            missing[:10],
        )
    extra = {"n_spots_measured": n_measured, "n_measured_spots_not_predicted": n_measured - len(barcodes)}
    return mat, missing, extra
