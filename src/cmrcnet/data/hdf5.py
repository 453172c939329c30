"""A time-limited first look at HDF5 files (.h5ad, 10x .h5, patch files) before they are read in this process.

libhdf5 can loop forever inside its C code on some corrupt files, e.g. a block of zeros where a heap of
variable-length strings was (h5py issue #2088; h5dump loops on them too). No Python signal reaches code stuck
there, Ctrl-C included. So on Linux a forked child process first opens the file and reads everything that lives
in HDF5's heaps (every attribute and every string dataset; numeric arrays are left alone) and is killed if that
takes too long; only then does the caller read the file itself. A probe that fails with a Python exception is
ignored here: the caller's own read raises the specific error.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import h5py

from cmrcnet.errors import InputFileError

PROBE_SECONDS = 30.0  # time limit of the probe for a small file; a healthy one takes milliseconds
PROBE_BYTES_PER_SECOND = 20e6  # extra time granted to large files (slow network disks)
_PROBED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of files that passed the probe in this process


def probe_hdf5(path: str | Path, what: str = "HDF5 file") -> None:
    """Raise InputFileError if reading the metadata and strings of `path` hangs or crashes libhdf5.

    A no-op where processes cannot be forked safely (Windows, macOS): there the file is read unprobed.
    """
    if not sys.platform.startswith("linux"):
        return
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return  # the caller's read reports a missing or unreadable file
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _PROBED:  # probed already in this process and unchanged since: no second fork
        return
    size = st.st_size
    limit = PROBE_SECONDS + size / PROBE_BYTES_PER_SECOND
    pid = os.fork()  # os.fork, not multiprocessing: works inside daemonic worker processes too
    if pid == 0:
        _probe_child(str(path))  # never returns
    status = _wait(pid, limit)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise InputFileError(
            f"corrupt {what}: libhdf5 did not finish reading its metadata within {limit:.0f} s (it loops "
            "forever on some damaged files); restore the file from a good copy",
            path=path,
        )
    if os.WIFSIGNALED(status):
        raise InputFileError(
            f"corrupt {what}: reading its metadata crashed libhdf5 (signal {os.WTERMSIG(status)})", path=path
        )
    _PROBED.add(key)


def _wait(pid: int, limit: float) -> int | None:
    """The child's wait status, or None if it is still running after `limit` seconds."""
    deadline = time.monotonic() + limit
    pause = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


def _probe_child(path: str) -> None:
    code = 0
    try:
        with h5py.File(path, "r") as f:
            _read_attrs(f)
            f.visititems(_visit)
    except BaseException:  # any Python-level error is reported by the caller's own read
        code = 1
    os._exit(code)


def _visit(name: str, obj: h5py.HLObject) -> None:
    _read_attrs(obj)
    try:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "OSU":
            obj[()]  # strings (variable-length ones live in the global heap)
    except Exception:  # an unreadable dataset: go on with the others
        pass


def _read_attrs(obj: h5py.HLObject) -> None:
    try:
        keys = list(obj.attrs)
    except Exception:
        return
    for key in keys:
        try:
            obj.attrs[key]
        except Exception:
            pass


def write_h5ad(adata, path: str | Path) -> None:
    """`adata.write_h5ad(path)`, with pandas' nullable string columns and indexes written as plain strings.

    pandas 3 makes every str column a nullable `StringDtype`. anndata up to at least 0.12 refuses to write those
    unless its `allow_write_nullable_strings` setting is on, and files written that way do not open in anndata
    0.10. Plain strings open everywhere. The caller's `adata` is left as it was."""
    frames = {"obs": adata.obs, "var": adata.var}
    plain = {name: _plain_strings(df) for name, df in frames.items()}
    if all(plain[name] is frames[name] for name in frames):
        adata.write_h5ad(path)
        return
    try:
        adata.obs, adata.var = plain["obs"], plain["var"]
        adata.write_h5ad(path)
    finally:
        adata.obs, adata.var = frames["obs"], frames["var"]


def _plain_strings(df):
    import pandas as pd

    def nullable(dtype) -> bool:
        if isinstance(dtype, pd.CategoricalDtype):
            return isinstance(dtype.categories.dtype, pd.StringDtype)
        return isinstance(dtype, pd.StringDtype)

    columns = [c for c in df.columns if nullable(df[c].dtype)]
    if not columns and not nullable(df.index.dtype):
        return df
    out = df.copy(deep=False)
    for c in columns:
        col = df[c]
        if isinstance(col.dtype, pd.CategoricalDtype):
            out[c] = col.cat.set_categories(pd.Index(list(col.cat.categories), dtype=object))
        else:
            out[c] = col.astype(object)
    out.index = pd.Index(list(df.index), dtype=object, name=df.index.name)
    return out
