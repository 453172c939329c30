"""The HDF5 probe runs once per file and process, and again when the file changes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cmrcnet.data import hdf5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the probe forks on Linux only")
def test_an_unchanged_file_is_probed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f["a"] = np.arange(3)
    forks = []
    real_fork = os.fork

    def counting_fork() -> int:
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(hdf5.os, "fork", counting_fork)
    monkeypatch.setattr(hdf5, "_PROBED", set())
    hdf5.probe_hdf5(path)
    hdf5.probe_hdf5(path)
    assert len(forks) == 1
    with h5py.File(path, "a") as f:  # changed: size and modification time differ
        f["b"] = np.arange(100)
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1_000_000))
    hdf5.probe_hdf5(path)
    assert len(forks) == 2
