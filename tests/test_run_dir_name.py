"""One name for the run folder: `run_dir`; the former keywords still work, with a DeprecationWarning."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import cmrcnet
from cmrcnet.errors import ConfigError
from cmrcnet.inference.batch import model_fingerprint, predict_slides
from cmrcnet.inference.slide import predict_slide
from cmrcnet.run.layout import one_run_dir
from cmrcnet.run.load import load_trained_model
from cmrcnet.workflows.train import train_run


class _Stop(Exception):
    pass


@pytest.mark.parametrize(
    "func", [cmrcnet.train, cmrcnet.Model.load, train_run, predict_slide, predict_slides, model_fingerprint,
             load_trained_model],
)  # fmt: skip
def test_run_folder_arguments_are_called_run_dir(func) -> None:
    params = inspect.signature(func).parameters
    assert "run_dir" in params and "model" not in params


def test_train_out_keyword_is_deprecated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict = {}

    def fake_train_run(**kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr("cmrcnet.workflows.train.train_run", fake_train_run)
    with pytest.warns(DeprecationWarning, match=r"train\(out=\.\.\.\) is deprecated; pass run_dir="):
        with pytest.raises(_Stop):
            cmrcnet.train(tmp_path, ["a"], out=tmp_path / "run", epochs=1)
    assert seen["run_dir"] == tmp_path / "run"


def test_one_run_dir(tmp_path: Path) -> None:
    assert one_run_dir(tmp_path, None, old_name="out_dir", func="train_run") == tmp_path
    with pytest.warns(DeprecationWarning, match=r"train_run\(out_dir=\.\.\.\) is deprecated"):
        assert one_run_dir(None, str(tmp_path), old_name="out_dir", func="train_run") == tmp_path
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="differ; give run_dir= only"):
        one_run_dir(tmp_path / "a", tmp_path / "b", old_name="out_dir", func="train_run")
    with pytest.raises(ConfigError, match="train needs the run folder: give run_dir="):
        one_run_dir(None, None, old_name="out", func="train")
