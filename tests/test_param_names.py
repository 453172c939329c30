"""Library errors name Python parameters (``pixel_size_um=``); the CLI prints its flags (``--pixel-size``)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cmrcnet
from cmrcnet.cli import build_parser, main
from cmrcnet.cli._common import COMMAND_PARAM_TO_FLAG, PARAM_TO_FLAG, flag_names
from cmrcnet.constants import SPATIAL_KEY
from cmrcnet.errors import InputFileError

SRC = Path(cmrcnet.__file__).parent
FLAG = re.compile(r"(?<![\w-])--[a-z]")


def _h5ad_without_pixel_size(path: Path, pixel_size_um: float | None = None) -> Path:
    """Raw counts on a square grid, no technology; records a pixel size only when one is given."""
    xy = np.array([[x, y] for y in range(4) for x in range(5)], dtype=np.float64) * 100.0 + 50.0  # (20, 2)
    a = ad.AnnData(
        X=np.random.default_rng(0).poisson(5.0, size=(len(xy), 6)).astype(np.float32) + 1,
        obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(6)]),
    )
    a.obsm[SPATIAL_KEY] = xy
    if pixel_size_um is not None:
        a.uns["pixel_size_um"] = pixel_size_um
    a.write_h5ad(path)
    return path


def _prepare(h5ad: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prepare",
        "--format",
        "anndata",
        "--input",
        str(h5ad),
        "--sample-id",
        "u",
        "--out",
        str(out),
        *extra,
    ]


def test_library_error_names_the_parameter_and_the_cli_prints_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h5ad = _h5ad_without_pixel_size(tmp_path / "u.h5ad")
    with pytest.raises(InputFileError, match=r"u\.h5ad: no pixel size .*pass pixel_size_um=") as caught:
        cmrcnet.read("anndata", input=h5ad, sample_id="u")
    assert "--pixel-size" not in str(caught.value)

    assert main(_prepare(h5ad, tmp_path / "ds")) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmrcnet prepare: error: ") and f"{h5ad}: no pixel size" in err
    assert "pass --pixel-size" in err and "pixel_size_um" not in err and "Traceback" not in err


def test_cli_log_lines_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog) -> None:
    h5ad = _h5ad_without_pixel_size(tmp_path / "m.h5ad", pixel_size_um=0.5)
    cmrcnet.read("anndata", input=h5ad, sample_id="m", pixel_size_um=1.0)  # the metadata disagrees: a warning
    assert "pixel_size_um=1.0000 um/px differs" in caplog.text
    main(_prepare(h5ad, tmp_path / "ds", "--pixel-size", "1.0"))
    err = capsys.readouterr().err
    assert "--pixel-size 1.0000 um/px differs" in err and "using --pixel-size" in err
    assert "pixel_size_um" not in err


@pytest.mark.parametrize(
    ("message", "command", "printed"),
    [
        ("pass resume=True to continue it, or choose another run_dir=", "train", "pass --resume to continue it, "
         "or choose another --out"),
        ("give run_dir=", "predict", "give --model"),
        ("device='cuda:1' requested", "train", "--device cuda:1 requested"),
        ("encoder='my folder' is neither", "train", "--encoder 'my folder' is neither"),
        ("use protocol='paper' only", "evaluate", "use --protocol paper only"),
        ("no seed given (e.g. seeds='0,1,2')", "cv", "no seed given (e.g. --seeds 0,1,2)"),
        ("train_samples=['A'] and k=5 at /runs/out=2", "train", "train_samples=['A'] and k=5 at /runs/out=2"),
    ],
)  # fmt: skip
def test_flag_names(message: str, command: str, printed: str) -> None:
    assert flag_names(message, command) == printed


def test_every_translated_flag_exists() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    flags = {opt for p in sub.choices.values() for a in p._actions for opt in a.option_strings}
    for command, table in COMMAND_PARAM_TO_FLAG.items():
        commands_flags = {opt for a in sub.choices[command]._actions for opt in a.option_strings}
        assert set(table.values()) <= commands_flags
    assert set(PARAM_TO_FLAG.values()) <= flags


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_library_messages_name_no_flag() -> None:
    """Errors raised and lines logged outside the CLI name parameters, never `--flags`."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if "cli" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                texts = _strings(node.exc)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and (isinstance(node.func.value, ast.Name) and node.func.value.id == "logger")
            ):
                texts = _strings(node)
            else:
                continue
            found += [f"{path.relative_to(SRC)}:{node.lineno}: {t}" for t in texts if FLAG.search(t)]
    assert not found, "\n".join(found)
