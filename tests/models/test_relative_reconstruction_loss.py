"""The relative reconstruction loss scores only what tells spots apart, whatever the embeddings' scale."""

from __future__ import annotations

import pytest
import torch

from cmrcnet.errors import ConfigError
from cmrcnet.models.losses import mse_loss_fp32, relative_reconstruction_loss


def test_exact_reconstruction_scores_0_and_the_batch_mean_scores_1() -> None:
    target = torch.randn(16, 8)
    assert relative_reconstruction_loss(target.clone(), target).item() == pytest.approx(0.0, abs=1e-6)
    mean = target.mean(dim=0, keepdim=True).expand_as(target)
    assert relative_reconstruction_loss(mean, target).item() == pytest.approx(1.0)
    assert relative_reconstruction_loss(target[:1], target[:1]).item() == 0.0  # one spot: nothing to tell apart


def test_the_shared_part_and_the_scale_do_not_change_it_but_they_dominate_the_mse() -> None:
    """A LayerNorm embedding is mostly shared by all spots; the plain MSE then barely sees spot differences."""
    torch.manual_seed(0)
    shared = 3.0 * torch.randn(1, 8)
    target, guess = shared + 0.1 * torch.randn(16, 8), shared + 0.1 * torch.randn(16, 8)
    rel = relative_reconstruction_loss(guess, target)
    torch.testing.assert_close(relative_reconstruction_loss(guess - shared, target - shared), rel)
    torch.testing.assert_close(relative_reconstruction_loss(10 * guess, 10 * target), rel)
    assert rel.item() > 1.0  # an unrelated guess is worse than the batch mean ...
    assert mse_loss_fp32(guess, target).item() < 0.05  # ... while its MSE looks tiny


def test_the_model_scores_its_reconstruction_with_the_configured_loss(tiny_config, model_batch) -> None:
    from cmrcnet.models.model import CMRCNet

    images, expr = model_batch
    values = {}
    for name in ("mse", "relative"):
        torch.manual_seed(0)
        model = CMRCNet(tiny_config("cmrcnet", recon_loss=name)).eval()
        torch.manual_seed(1)  # the same mask
        with torch.no_grad():
            tokens, emb = model.encode_image(images)
            recon = model.reconstruct(tokens, expr)
        score = relative_reconstruction_loss if name == "relative" else mse_loss_fp32
        torch.manual_seed(1)
        values[name] = model.loss(images, expr)["reconstruction"]
        torch.testing.assert_close(values[name], torch.log1p(score(recon, emb)))
    assert values["mse"].item() != pytest.approx(values["relative"].item())
    with pytest.raises(ConfigError, match="recon_loss"):
        tiny_config("cmrcnet", recon_loss="cosine")
