"""The analytic FLOP count against torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cmrcnet.models import METHODS, ModelConfig, build_model, model_flops_per_spot


@pytest.mark.parametrize("method", METHODS)
def test_forward_flops_match_torch_counter(method: str) -> None:
    cfg = ModelConfig.from_preset("tiny", n_genes=40, method=method)
    model = build_model(cfg)
    batch = 4
    with FlopCounterMode(display=False) as counter:
        model.loss(torch.randn(batch, 3, 32, 32), torch.rand(batch, 40))
    measured = counter.get_total_flops() / batch
    analytic = model_flops_per_spot(cfg, training=False, batch_size=batch)
    assert analytic == pytest.approx(measured, rel=0.1)


def test_training_is_three_forwards_and_paper_size() -> None:
    cfg = ModelConfig(n_genes=1000, method="bleep")
    forward = model_flops_per_spot(cfg, training=False)
    assert model_flops_per_spot(cfg) == 3 * forward
    # timm lists ViT-B/32 (depth 12) at 4.4 GMACs = 8.8 GFLOPs; depth 8 is about 8/12 of that
    assert 5.6e9 < forward < 6.3e9
    cmrcnet = model_flops_per_spot(ModelConfig(n_genes=1000), training=False)
    assert forward < cmrcnet < 1.1 * forward  # the reconstruction branch is small next to the encoder


def test_frozen_encoder_training_counts_only_the_heads() -> None:
    from cmrcnet.models.config import ModelConfig
    from cmrcnet.models.flops import model_flops_per_spot

    full = ModelConfig.from_preset("cpu", n_genes=250)
    frozen = ModelConfig.from_preset("cpu", n_genes=250, freeze_encoder=True)
    inference = model_flops_per_spot(full, training=False)
    assert model_flops_per_spot(frozen, training=False) == inference
    assert model_flops_per_spot(frozen) < model_flops_per_spot(full) / 2  # no encoder forward or backward
    with_hc = ModelConfig.from_preset("cpu", n_genes=250, handcrafted_features=True)
    assert model_flops_per_spot(with_hc, training=False) > inference
