"""Fixtures for the training tests: a small prepared SYNTHETIC dataset, the "tiny" run config, one thread.

Test modules import plain helpers from `training_utils.py` (conftest modules are not importable by name: pytest
keeps one module called `conftest` at a time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from cmrcnet.data.prepare import prepare_sample
from cmrcnet.data.synthetic import SyntheticConfig, make_synthetic_samples
from cmrcnet.run.config import RunConfig, load_run_config
from cmrcnet.training.trainer import TrainResult
from cmrcnet.workflows.train import train_run

from training_utils import EXPRESSION_ONLY, TRAIN_SAMPLES


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, several threads make tiny models many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synthetic_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared dataset: synS1 and synS2 (35 spots each, 32 px patches) and synS3 without an image."""
    root = tmp_path_factory.mktemp("synthetic_ds")
    samples = make_synthetic_samples(SyntheticConfig(n_slides=3, n_rows=6, n_cols=6, n_genes=30))
    for sample in samples:
        if sample.sample_id == EXPRESSION_ONLY:
            sample = dataclasses.replace(sample, image=None)
        prepare_sample(sample, root, patch_px=32, progress=False)
    return root


@pytest.fixture
def tiny_run_config() -> Callable[..., RunConfig]:
    """A factory: the "tiny" preset with `train` fields overridden by keyword."""

    def make(**train: object) -> RunConfig:
        cfg = load_run_config("tiny")
        for key, value in train.items():
            setattr(cfg.train, key, value)
        cfg.validate()
        return cfg

    return make


@pytest.fixture
def train_tiny(synthetic_ds: Path) -> Callable[..., TrainResult]:
    """A factory: train on TRAIN_SAMPLES of `synthetic_ds` into `out` without progress bars."""

    def run(out: Path, config: RunConfig, *, resume: bool = False) -> TrainResult:
        return train_run(
            data_dir=synthetic_ds,
            train_samples=TRAIN_SAMPLES,
            run_dir=out,
            config=config,
            resume=resume,
            progress=False,
        )

    return run
