"""Fixtures shared by the inference tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmrcnet.data.prepare import prepare_sample
from cmrcnet.data.synthetic import SyntheticConfig, make_synthetic_samples
from cmrcnet.run.config import load_run_config
from cmrcnet.workflows.train import train_run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run (tiny ViT, 1 epoch) on two synthetic slides with a reference bank."""
    root = tmp_path_factory.mktemp("slide_run")
    ds = root / "ds"
    for s in make_synthetic_samples(
        SyntheticConfig(n_slides=2, n_patients=1, n_rows=6, n_cols=6, n_genes=30)
    ):
        prepare_sample(s, ds, patch_px=32, progress=False)
    cfg = load_run_config("tiny")
    cfg.train.epochs = 1
    train_run(data_dir=ds, train_samples=["synS1", "synS2"], run_dir=root / "run", config=cfg, progress=False)
    return root / "run"

