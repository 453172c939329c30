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
    cfg = ModelConfig(n_genes=1000)
    forward = model_flops_per_spot(cfg, training=False)
    assert model_flops_per_spot(cfg) == 3 * forward
    # ViT-B/32 at depth 8: about 8/12 of ViT-B/32's 4.4 GFLOPs (2 x 2.2 GMACs)
    assert 2.5e9 < forward < 4.0e9
