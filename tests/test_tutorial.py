"""The tutorial (docs/tutorial.py) runs end to end through the public API, as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tutorial_runs_on_synthetic_data(tmp_path: Path) -> None:
    env = {**os.environ, "CMRCNET_TUTORIAL_CONFIG": "tiny", "CMRCNET_TUTORIAL_EPOCHS": "1"}
    env["CMRCNET_TUTORIAL_DIR"] = str(tmp_path)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "tutorial.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tutorial finished in" in done.stdout
    assert (tmp_path / "run" / "bank.pt").is_file() and (tmp_path / "slide" / "prediction.h5ad").is_file()


def test_the_api_is_what_the_package_exports() -> None:
    import cmrcnet
    from cmrcnet import api

    for name in ("read", "prepare", "train", "predict", "predict_slide", "evaluate", "cv", "Model"):
        assert getattr(cmrcnet, name) is getattr(api, name)


@pytest.mark.parametrize(
    ("argv", "function", "expected"),
    [
        (
            ["train", "--data", "D", "--train-samples", "a,b", "--out", "R", "--epochs", "3"],
            "train",
            {"epochs": 3},
        ),
        (
            ["train", "--data", "D", "--train-samples", "a", "--out", "R", "--no-tumour-markers"],
            "train",
            {"tumour_markers": False},
        ),
        (
            ["predict", "--model", "R", "--data", "D", "--samples", "c", "--out", "p.h5ad", "--k", "7"],
            "predict",
            {"k": 7},
        ),
        (["evaluate", "--pred", "p.h5ad", "--data", "D", "--out", "E"], "evaluate", {"protocol": "strict"}),
        (["cv", "--data", "D", "--split", "kfold", "--out", "C", "--epochs", "2"], "cv", {"epochs": 2}),
        (
            ["predict-slide", "--model", "R", "--slide", "s.png", "--out", "S", "--pixel-size", "0.5"],
            "predict_slide",
            {"pixel_size_um": 0.5},
        ),
    ],
)
def test_the_cli_calls_the_api(monkeypatch, capsys, argv: list[str], function: str, expected: dict) -> None:
    """Each command parses its arguments and calls the public function (here replaced by a probe)."""
    from cmrcnet import api, cli
    from cmrcnet.errors import ConfigError

    seen: dict = {}

    def probe(*args, **kwargs):
        seen.update(kwargs, args=args)
        raise ConfigError("probe reached")

    monkeypatch.setattr(api, function, probe)
    assert cli.main(argv) == 2
    assert "probe reached" in capsys.readouterr().err
    assert {k: seen.get(k) for k in expected} == expected
