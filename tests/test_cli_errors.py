"""User errors through the CLI: exit code 2, one message naming the file, nothing half-written."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmrcnet.cli import main
from cmrcnet.data.synthetic import SyntheticConfig, write_synthetic_raw

SID = "synS1"


@pytest.fixture(scope="module")
def raw_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    write_synthetic_raw(root, SyntheticConfig(n_slides=1, n_patients=1, n_rows=4, n_cols=4, n_genes=20))
    return root


@pytest.fixture
def raw(raw_template: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "raw"
    shutil.copytree(raw_template, dst)
    return dst


def _counts(raw: Path) -> pd.DataFrame:
    return pd.read_csv(raw / "counts" / f"{SID}.tsv.gz", sep="\t", index_col=0)


def _write_counts(raw: Path, df: pd.DataFrame) -> None:
    with gzip.open(raw / "counts" / f"{SID}.tsv.gz", "wt") as fh:
        df.to_csv(fh, sep="\t")


def _missing_counts(raw: Path) -> str:
    (raw / "counts" / f"{SID}.tsv.gz").unlink()
    return f"{SID}.tsv"


def _truncated_counts(raw: Path) -> str:
    p = raw / "counts" / f"{SID}.tsv.gz"
    p.write_bytes(p.read_bytes()[:200])
    return f"{SID}.tsv.gz"


def _small_image(raw: Path) -> str:
    p = raw / "images" / f"{SID}.png"
    Image.open(p).resize((100, 100)).save(p)
    return f"{SID}.png"


def _no_common_spots(raw: Path) -> str:
    df = _counts(raw)
    df.index = [f"9{i}x9{i}" for i in range(len(df))]
    _write_counts(raw, df)
    return f"{SID}.tsv.gz"


def _duplicated_ids(raw: Path) -> str:
    df = _counts(raw)
    df.index = [df.index[0], *df.index[:-1]]
    _write_counts(raw, df)
    return "duplicated"


def _negative_counts(raw: Path) -> str:
    df = _counts(raw)
    df.iloc[0, 0] = -3
    _write_counts(raw, df)
    return "negative"


def _nan_counts(raw: Path) -> str:
    df = _counts(raw).astype(float)
    df.iloc[1, 1] = np.nan
    _write_counts(raw, df)
    return "NaN"


def _corrupt_image(raw: Path) -> str:
    (raw / "images" / f"{SID}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return f"{SID}.png"


CASES: dict[str, Callable[[Path], str]] = {
    "missing counts": _missing_counts,
    "truncated counts": _truncated_counts,
    "image smaller than coordinates": _small_image,
    "no common spots": _no_common_spots,
    "duplicated spot ids": _duplicated_ids,
    "negative counts": _negative_counts,
    "nan counts": _nan_counts,
    "corrupt image": _corrupt_image,
}


@pytest.mark.parametrize("case", list(CASES))
def test_prepare_bad_input_exits_2(
    case: str, raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    expected = CASES[case](raw)
    out = tmp_path / "ds"
    rc = main(
        [
            "prepare",
            "--format",
            "st",
            "--input",
            str(raw),
            "--sample-id",
            SID,
            "--pixel-size",
            "1",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_debug_shows_traceback(raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _missing_counts(raw)
    rc = main(
        [
            "prepare",
            "--format",
            "st",
            "--input",
            str(raw),
            "--sample-id",
            SID,
            "--out",
            str(tmp_path / "d"),
            "--debug",
            "--quiet",
        ]
    )
    assert rc == 2 and "Traceback" in capsys.readouterr().err


def test_failed_prepare_keeps_the_previous_version(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    args = [
        "prepare",
        "--format",
        "st",
        "--input",
        str(raw),
        "--sample-id",
        SID,
        "--pixel-size",
        "1",
        "--patch-px",
        "32",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _negative_counts(raw)
    assert main(args) == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "--data", "nowhere", "--train-samples", "a", "--out", "r"],
            "prepared dataset folder not found",
        ),
        (["prepare", "--format", "st", "--out", "x"], "--input"),
        (["predict", "--model", "nowhere", "--data", "d", "--samples", "a", "--out", "p.h5ad"], "run folder"),
        (["evaluate", "--pred", "nowhere.h5ad", "--data", "d", "--out", "e"], "nowhere.h5ad"),
    ],
)
def test_other_commands_fail_cleanly(
    argv: list[str], message: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main([*argv, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
