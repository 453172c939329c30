"""Fixtures for the model tests: tiny synthetic batches on the CPU."""

from __future__ import annotations

import pytest
import torch

from cmrcnet.models import ModelConfig

N_GENES = 12


@pytest.fixture
def tiny_config():
    """A factory: the "tiny" preset for any method, with optional overrides."""

    def make(method: str = "cmrcnet", **overrides) -> ModelConfig:
        return ModelConfig.from_preset("tiny", n_genes=N_GENES, method=method, **overrides)

    return make


@pytest.fixture
def model_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 random 32 x 32 images and their (non-negative, log1p-like) expression over N_GENES genes."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, generator=g)
    expr = torch.log1p(torch.rand(8, N_GENES, generator=g) * 10)
    return images, expr
