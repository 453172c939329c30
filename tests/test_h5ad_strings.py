"""Predictions and prepared samples are written with plain strings, so that pandas 3 (whose str columns are
nullable StringDtype) works with anndata versions that refuse to write those, and the files open in anndata 0.10."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cmrcnet.data.hdf5 import write_h5ad


def _nullable_strings() -> ad.AnnData:
    obs = pd.DataFrame({"sample_id": pd.array(["C2", "C2", "C3"], dtype="string"),
                        "label": pd.Categorical(pd.array(["a", "b", "a"], dtype="string")),
                        "x": [1.0, 2.0, 3.0]},
                       index=pd.Index(["s1", "s2", "s3"], dtype="string", name="barcode"))
    var = pd.DataFrame(index=pd.Index(["ERBB2", "GRB7"], dtype="string"))
    return ad.AnnData(np.arange(6, dtype=np.float32).reshape(3, 2), obs=obs, var=var)


def test_nullable_string_columns_are_written_as_plain_strings(tmp_path: Path) -> None:
    a = _nullable_strings()
    before = a.obs.dtypes.copy()
    write_h5ad(a, tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    assert back.obs["sample_id"].tolist() == ["C2", "C2", "C3"]
    assert back.obs["label"].tolist() == ["a", "b", "a"] and back.obs["x"].tolist() == [1.0, 2.0, 3.0]
    assert list(back.obs_names) == ["s1", "s2", "s3"] and list(back.var_names) == ["ERBB2", "GRB7"]
    np.testing.assert_array_equal(back.X, a.X)
    assert (a.obs.dtypes == before).all() and isinstance(a.obs.index.dtype, pd.StringDtype)  # caller's untouched


def test_the_plain_writer_is_needed_where_anndata_refuses_nullable_strings(tmp_path: Path) -> None:
    a = _nullable_strings()
    try:
        a.write_h5ad(tmp_path / "direct.h5ad")
    except RuntimeError as e:  # anndata 0.11/0.12 without allow_write_nullable_strings
        assert "nullable" in str(e)
    else:
        pytest.skip(f"anndata {ad.__version__} writes nullable strings itself")
    write_h5ad(a, tmp_path / "ours.h5ad")
    assert ad.read_h5ad(tmp_path / "ours.h5ad").n_obs == 3
