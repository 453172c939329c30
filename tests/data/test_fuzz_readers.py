"""Fuzzing the readers with mutated small inputs: each call returns a valid Sample or raises CmrcnetError.

Any other exception (KeyError, ValueError, IndexError, ...) is a reader bug: the CLI would show a traceback
instead of one line naming the file. Examples are derandomized, so a CI run tests the same inputs every time.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cmrcnet.constants import SPATIAL_KEY
from cmrcnet.data import hdf5
from cmrcnet.data.readers import read_10x_h5, read_anndata, read_st, read_visium
from cmrcnet.data.sample import Sample
from cmrcnet.errors import CmrcnetError

from sample_factory import write_visium_outs

# CMRCNET_FUZZ_EXAMPLES=2000 runs a longer, randomized search (locally); CI runs the same 50 examples each time.
_DEEP = int(os.environ.get("CMRCNET_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_DEEP or 50,
    deadline=None,
    derandomize=not _DEEP,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECONDS_PER_CALL = 10  # a reader that takes longer on a tiny file is stuck
PROBE_SECONDS = 2  # time limit of cmrcnet.data.hdf5's probe here (its files are tiny)

# --- mutations ----------------------------------------------------------------------------------------------
NUMBER_REPLACEMENTS = [
    "NaN",
    "nan",
    "inf",
    "-inf",
    "-1",
    "-7.5",
    "1e308",
    "1e999",
    "abc",
    "",
    "0",
    "2.5",
    "x1",
]
JUNK_LINES = ["", "\t", "#comment", "junk", "1x1\t3\t4", "a,b,c", "\x00\x01", "9\t9\t9\t9\t9\t9\t9", "é,ü"]

_text_op = st.one_of(
    st.tuples(st.just("replace_number"), st.integers(0, 10_000), st.sampled_from(NUMBER_REPLACEMENTS)),
    st.tuples(st.just("insert_line"), st.integers(0, 10_000), st.sampled_from(JUNK_LINES)),
    st.tuples(st.just("delete_line"), st.integers(0, 10_000)),
    st.tuples(st.just("duplicate_line"), st.integers(0, 10_000)),
    st.tuples(
        st.just("swap_separator"), st.sampled_from([("\t", ","), (",", "\t"), ("\t", " "), (",", ";")])
    ),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
)
_binary_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(1, 255)),
    st.tuples(st.just("zero_block"), st.integers(0, 2**20), st.integers(1, 512)),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
)


def mutate_text(data: bytes, ops: list[tuple]) -> bytes:
    for op in ops:
        kind = op[0]
        lines = data.split(b"\n")
        if kind == "replace_number":
            tokens = [
                (i, j) for i, line in enumerate(lines) for j, t in enumerate(_split(line)) if _is_number(t)
            ]
            if tokens:
                i, j = tokens[op[1] % len(tokens)]
                sep = b"\t" if b"\t" in lines[i] else b","
                parts = lines[i].split(sep)
                if j < len(parts):
                    parts[j] = op[2].encode()
                    lines[i] = sep.join(parts)
        elif kind == "insert_line":
            lines.insert(op[1] % (len(lines) + 1), op[2].encode())
        elif kind == "delete_line" and lines:
            del lines[op[1] % len(lines)]
        elif kind == "duplicate_line" and lines:
            i = op[1] % len(lines)
            lines.insert(i, lines[i])
        elif kind == "swap_separator":
            a, b = op[1]
            lines = [line.replace(a.encode(), b.encode()) for line in lines]
        data = b"\n".join(lines)
        if kind == "flip" and data:
            data = _flip(data, op[1], op[2])
        elif kind == "truncate":
            data = data[: int(len(data) * op[1])]
    return data


def mutate_binary(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op in ops:
        if not buf:
            break
        if op[0] == "flip":
            i = op[1] % len(buf)
            buf[i] ^= op[2]
        elif op[0] == "zero_block":
            i = op[1] % len(buf)
            buf[i : i + op[2]] = bytes(len(buf[i : i + op[2]]))
        elif op[0] == "truncate":
            del buf[int(len(buf) * op[1]) :]
    return bytes(buf)


def _split(line: bytes) -> list[bytes]:
    return line.split(b"\t") if b"\t" in line else line.split(b",")


def _is_number(token: bytes) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _flip(data: bytes, pos: int, mask: int) -> bytes:
    buf = bytearray(data)
    buf[pos % len(buf)] ^= mask
    return bytes(buf)


# --- checks -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail a call that runs longer than `seconds` (SIGALRM; the readers are single-threaded Python)."""

    def _raise(signum, frame):
        raise TimeoutError(f"reader ran for more than {seconds} s")

    if sys.platform == "win32":  # no SIGALRM: skip the bound rather than the test
        yield
        return
    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_or_clean_error(reader, *args, **kwargs) -> Sample | None:
    """The reader's Sample, or None when it raised CmrcnetError; any other exception propagates (a bug)."""
    with time_limit(SECONDS_PER_CALL):
        try:
            return reader(*args, **kwargs)
        except CmrcnetError as exc:
            assert str(exc).strip() and "\n" not in str(exc)
            return None


def check_valid(sample: Sample | None) -> None:
    if sample is None:
        return
    assert sample.n_spots > 0 and sample.counts.n_vars > 0
    xy = sample.coords
    assert xy.shape == (sample.n_spots, 2) and np.isfinite(xy).all()
    x = sample.counts.X
    data = x.data if sp.issparse(x) else np.asarray(x)
    assert np.isfinite(data).all() and (data >= 0).all()
    assert sample.counts.obs_names.is_unique
    assert math.isfinite(sample.pixel_size_um) and sample.pixel_size_um > 0
    if sample.image is not None:  # check_coords_inside_image passed
        w, h = sample.image.full_res_size
        assert (xy[:, 0] <= w + 1).all() and (xy[:, 1] <= h + 1).all()


def _child(conn, reader, args, kwargs) -> None:
    try:
        check_valid(read_or_clean_error(reader, *args, **kwargs))
        conn.send(("ok", ""))
    except BaseException:
        conn.send(("bug", traceback.format_exc()))
    finally:
        conn.close()


def read_in_child(reader, *args, **kwargs) -> None:
    """`check_valid(read_or_clean_error(...))` in a forked process killed after SECONDS_PER_CALL.

    For HDF5 inputs: libhdf5 can loop forever inside C code on some corrupted files (h5py issue #2088), where
    SIGALRM never gets to run. The readers guard against that (`cmrcnet.data.hdf5.probe_hdf5`); a separate
    process here keeps the test bounded even if a hang or a crash slips past the guard, and names it.
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork() to bound a reader stuck in C code")
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(sender, reader, args, kwargs))
    proc.start()
    sender.close()
    try:
        if not receiver.poll(SECONDS_PER_CALL):
            proc.kill()
            pytest.fail(f"{reader.__name__} ran for more than {SECONDS_PER_CALL} s")
        try:
            status, detail = receiver.recv()
        except EOFError:
            proc.join()
            pytest.fail(f"{reader.__name__} crashed the process (exit code {proc.exitcode})")
    finally:
        proc.join()
        receiver.close()
    assert status == "ok", detail


class Originals(dict):
    """The valid input files by name; a short repr keeps Hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"Originals({sorted(self)})"


# --- valid inputs -------------------------------------------------------------------------------------------
def st_tables() -> tuple[bytes, bytes]:
    """A 5 x 4 ST section: counts TSV (spots x 6 genes) and its selection TSV; 100 px pitch, 1 um/px."""
    rng = np.random.default_rng(0)
    xs, ys = np.meshgrid(np.arange(1, 6), np.arange(1, 5))
    ids = [f"{x}x{y}" for x, y in zip(xs.ravel(), ys.ravel(), strict=True)]
    counts = pd.DataFrame(rng.poisson(4, (len(ids), 6)) + 1, index=ids, columns=[f"G{i}" for i in range(6)])
    sel = pd.DataFrame(
        {
            "x": xs.ravel(),
            "y": ys.ravel(),
            "new_x": xs.ravel() + 0.01,
            "new_y": ys.ravel(),
            "pixel_x": 50.0 + 200 * (xs.ravel() - 1),
            "pixel_y": 50.0 + 200 * (ys.ravel() - 1),
            "selected": 1,
        }
    )
    return counts.to_csv(sep="\t").encode(), sel.to_csv(sep="\t", index=False).encode()


def small_h5ad(path: Path) -> Path:
    rows, cols = np.mgrid[0:4, 0:8]
    keep = (rows + cols) % 2 == 0
    rows, cols = rows[keep], cols[keep]
    a = ad.AnnData(
        X=sp.csr_matrix(np.random.default_rng(1).poisson(3.0, (len(rows), 5)).astype(np.float32) + 1),
        obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"s{i}" for i in range(len(rows))]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(5)]),
    )
    a.obsm[SPATIAL_KEY] = np.column_stack([40 + cols * 50.0, 40 + rows * 86.6])
    a.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 65.0}}}
    a.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Originals:
    root = tmp_path_factory.mktemp("fuzz_originals")
    counts, spots = st_tables()
    outs = write_visium_outs(root / "outs")
    return Originals(
        {
            "counts": counts,
            "spots": spots,
            "positions": (outs / "spatial" / "tissue_positions.csv").read_bytes(),
            "scalefactors": (outs / "spatial" / "scalefactors_json.json").read_bytes(),
            "h5": (outs / "filtered_feature_bc_matrix.h5").read_bytes(),
            "hires": (outs / "spatial" / "tissue_hires_image.png").read_bytes(),
            "h5ad": small_h5ad(root / "a.h5ad").read_bytes(),
        }
    )


def test_unmutated_inputs_read(originals: dict[str, bytes], tmp_path: Path) -> None:
    """Positive control: every original is valid, so the errors below come from the mutations."""
    (tmp_path / "c.tsv").write_bytes(originals["counts"])
    (tmp_path / "s.tsv").write_bytes(originals["spots"])
    (tmp_path / "a.h5ad").write_bytes(originals["h5ad"])
    outs = write_visium_outs(tmp_path / "outs")
    check_valid(read_st(counts=tmp_path / "c.tsv", spots=tmp_path / "s.tsv", sample_id="A1"))
    check_valid(read_anndata(tmp_path / "a.h5ad", technology="visium"))
    check_valid(read_visium(outs))
    assert read_10x_h5(outs / "filtered_feature_bc_matrix.h5").n_obs == 16


# --- the fuzz tests -----------------------------------------------------------------------------------------
@FUZZ
@given(
    counts_ops=st.lists(_text_op, max_size=3),
    spots_ops=st.lists(_text_op, max_size=3),
    pixel_size=st.sampled_from([None, 1.0]),
    with_image=st.booleans(),
)
def test_fuzz_st_tables(originals, tmp_path, counts_ops, spots_ops, pixel_size, with_image) -> None:
    counts, spots, image = tmp_path / "A1.tsv", tmp_path / "A1_selection.tsv", tmp_path / "A1.png"
    counts.write_bytes(mutate_text(originals["counts"], counts_ops))
    spots.write_bytes(mutate_text(originals["spots"], spots_ops))
    if with_image and not image.exists():
        Image.new("RGB", (900, 700), (230, 200, 220)).save(image)
    sample = read_or_clean_error(
        read_st,
        counts=counts,
        spots=spots,
        image=image if with_image else None,
        sample_id="A1",
        pixel_size_um=pixel_size,
    )
    check_valid(sample)


@FUZZ
@given(
    positions_ops=st.lists(_text_op, max_size=3),
    scalefactor_ops=st.lists(_text_op, max_size=2),
    pixel_size=st.sampled_from([None, 1.0]),
)
def test_fuzz_visium_positions_and_scalefactors(
    originals, tmp_path, positions_ops, scalefactor_ops, pixel_size
) -> None:
    outs = tmp_path / "outs"
    (outs / "spatial").mkdir(parents=True, exist_ok=True)
    (outs / "filtered_feature_bc_matrix.h5").write_bytes(originals["h5"])
    (outs / "spatial" / "tissue_hires_image.png").write_bytes(originals["hires"])
    (outs / "spatial" / "tissue_positions.csv").write_bytes(
        mutate_text(originals["positions"], positions_ops)
    )
    factors = mutate_text(originals["scalefactors"].replace(b", ", b",\n"), scalefactor_ops)
    (outs / "spatial" / "scalefactors_json.json").write_bytes(factors)
    check_valid(read_or_clean_error(read_visium, outs, pixel_size_um=pixel_size))


@FUZZ
@given(ops=st.lists(_binary_op, min_size=1, max_size=4))
def test_fuzz_10x_h5_bytes(originals, tmp_path, monkeypatch, ops) -> None:
    monkeypatch.setattr(hdf5, "PROBE_SECONDS", PROBE_SECONDS)
    outs = tmp_path / "outs"
    (outs / "spatial").mkdir(parents=True, exist_ok=True)
    for name in ("positions", "scalefactors", "hires"):
        target = {
            "positions": "tissue_positions.csv",
            "scalefactors": "scalefactors_json.json",
            "hires": "tissue_hires_image.png",
        }[name]
        (outs / "spatial" / target).write_bytes(originals[name])
    (outs / "filtered_feature_bc_matrix.h5").write_bytes(mutate_binary(originals["h5"], ops))
    read_in_child(read_visium, outs)


@FUZZ
@given(ops=st.lists(_binary_op, min_size=1, max_size=4), technology=st.sampled_from(["visium", "unknown"]))
def test_fuzz_h5ad_bytes(originals, tmp_path, monkeypatch, ops, technology) -> None:
    monkeypatch.setattr(hdf5, "PROBE_SECONDS", PROBE_SECONDS)
    path = tmp_path / "a.h5ad"
    path.write_bytes(mutate_binary(originals["h5ad"], ops))
    read_in_child(read_anndata, path, technology=technology)


_BAD_VALUES = st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.5, 1e30, 0.0])
_content_op = st.one_of(
    st.tuples(st.just("x_value"), st.integers(0, 1000), _BAD_VALUES),
    st.tuples(st.just("coord_value"), st.integers(0, 1000), _BAD_VALUES),
    st.tuples(st.just("coords_shape"), st.sampled_from([(1,), (3,), (0,)])),
    st.tuples(st.just("drop_coords")),
    st.tuples(st.just("coords_in_obs")),
    st.tuples(st.just("duplicate_spot"), st.integers(0, 1000)),
    st.tuples(st.just("duplicate_gene"), st.integers(0, 1000)),
    st.tuples(st.just("no_spots")),
    st.tuples(st.just("no_genes")),
    st.tuples(st.just("array_col_text"), st.integers(0, 1000)),
    st.tuples(st.just("uns_pixel_size"), st.sampled_from([0.5, -1.0, np.nan, "abc", [1, 2], 0.0])),
    st.tuples(st.just("spot_diameter"), st.sampled_from([0.0, -3.0, np.nan, "x", 1e-9, 1e9])),
    st.tuples(st.just("dense_int_x")),
    st.tuples(st.just("counts_layer_only")),
)
# applied last: helpers above would crash on a matrix whose indices point outside it
_corrupt_index_op = st.none() | st.tuples(
    st.just("sparse_index"), st.integers(0, 1000), st.sampled_from([-1, 5, 10**6])
)


def _apply_content(a: ad.AnnData, op: tuple) -> ad.AnnData:
    kind = op[0]
    x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X, dtype=np.float64)
    if kind == "x_value" and x.size:
        x.flat[op[1] % x.size] = op[2]
        a.X = sp.csr_matrix(x)
    elif kind == "coord_value" and SPATIAL_KEY in a.obsm and np.size(a.obsm[SPATIAL_KEY]):
        xy = np.asarray(a.obsm[SPATIAL_KEY], dtype=np.float64).copy()
        xy.flat[op[1] % xy.size] = op[2]
        a.obsm[SPATIAL_KEY] = xy
    elif kind == "coords_shape":
        a.obsm[SPATIAL_KEY] = np.zeros((a.n_obs, *op[1]))
    elif kind == "drop_coords" and SPATIAL_KEY in a.obsm:
        del a.obsm[SPATIAL_KEY]
    elif kind == "coords_in_obs" and SPATIAL_KEY in a.obsm and np.size(a.obsm[SPATIAL_KEY]):
        xy = np.asarray(a.obsm.pop(SPATIAL_KEY), dtype=np.float64).reshape(a.n_obs, -1)
        a.obs["pxl_col_in_fullres"], a.obs["pxl_row_in_fullres"] = xy[:, 0], xy[:, -1]
    elif kind == "duplicate_spot" and a.n_obs > 1:
        names = list(a.obs_names)
        names[(op[1] + 1) % len(names)] = names[op[1] % len(names)]
        a.obs_names = names
    elif kind == "duplicate_gene" and a.n_vars > 1:
        names = list(a.var_names)
        names[(op[1] + 1) % len(names)] = names[op[1] % len(names)]
        a.var_names = names
    elif kind == "no_spots":
        a = a[:0].copy()
    elif kind == "no_genes":
        a = a[:, :0].copy()
    elif kind == "array_col_text" and "array_col" in a.obs and a.n_obs:
        col = a.obs["array_col"].astype(object).to_numpy()
        col[op[1] % len(col)] = "n/a"
        a.obs["array_col"] = col.astype(str)
    elif kind == "uns_pixel_size":
        a.uns["pixel_size_um"] = op[1]
    elif kind == "spot_diameter":
        a.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": op[1]}}}
    elif kind == "dense_int_x":
        a.X = x.astype(np.int64) if np.isfinite(x).all() else x
    elif kind == "sparse_index" and sp.issparse(a.X) and a.X.nnz:
        x = a.X.tocsr().copy()
        x.indices[op[1] % x.nnz] = a.n_vars + op[2] if op[2] >= 0 else -1  # out of range: a corrupt file
        a.X = x
    elif kind == "counts_layer_only":
        a.layers["counts"] = a.X.copy()
        a.X = sp.csr_matrix(np.log1p(x) + 0.01)
    return a


@FUZZ
@given(
    ops=st.lists(_content_op, min_size=1, max_size=3),
    corrupt=_corrupt_index_op,
    technology=st.sampled_from(["visium", "unknown"]),
)
def test_fuzz_h5ad_content(originals, tmp_path, ops, corrupt, technology) -> None:
    """Well-formed HDF5 holding bad content: what a careless writer (or another tool) may produce."""
    src = tmp_path / "src.h5ad"
    src.write_bytes(originals["h5ad"])
    a = ad.read_h5ad(src)
    for op in [*ops, *([corrupt] if corrupt else [])]:
        a = _apply_content(a, op)
    path = tmp_path / "a.h5ad"
    try:
        a.write_h5ad(path)
    except Exception:  # anndata refuses to write some of these objects; nothing to read then
        return
    read_in_child(read_anndata, path, technology=technology)


def test_mutations_change_the_input() -> None:
    """The mutation helpers really mutate (else the fuzz tests would test nothing)."""
    data = b"a\tb\n1x1\t3\n2x1\t4\n"
    assert mutate_text(data, [("replace_number", 0, "NaN")]) == b"a\tb\n1x1\tNaN\n2x1\t4\n"
    assert mutate_text(data, [("delete_line", 1)]) == b"a\tb\n2x1\t4\n"
    assert mutate_text(data, [("truncate", 0.5)]) == data[: len(data) // 2]
    assert mutate_binary(b"\x00\x00", [("flip", 1, 3)]) == b"\x00\x03"
