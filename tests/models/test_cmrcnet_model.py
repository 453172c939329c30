"""The whole model: stages, shapes, training signal, mixed precision, save/load."""

from __future__ import annotations

import io

import pytest
import torch

from cmrcnet.errors import ConfigError
from cmrcnet.models import METHODS, CMRCNet, ModelConfig, build_model

N_GENES = 12


def _model(tiny_config, method: str, **overrides) -> CMRCNet:
    torch.manual_seed(0)
    return build_model(tiny_config(method, **overrides))


@pytest.mark.parametrize("method", METHODS)
def test_stage_shapes_and_finite_losses(tiny_config, model_batch, method: str) -> None:
    images, expr = model_batch
    model = _model(tiny_config, method)
    tokens, img_emb = model.encode_image(images)
    assert tokens.shape == (8, 17, 32)
    assert img_emb.shape == (8, 256)
    assert torch.equal(model.eval().embed_images(images), model.encode_image(images)[1])
    model.train()
    losses = model.loss(images, expr)
    expected_keys = {
        "cmrcnet": {"loss", "contrastive", "reconstruction"},
        "bleep": {"loss", "contrastive"},
        "regression": {"loss", "regression"},
    }[method]
    assert set(losses) == expected_keys
    for value in losses.values():
        assert value.shape == () and value.dtype == torch.float32 and torch.isfinite(value)
    assert torch.allclose(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    if method == "regression":
        assert model.predict_expression(images).shape == (8, N_GENES)
        with pytest.raises(ConfigError, match="has no expression encoder"):
            model.encode_expression(expr)
    else:
        assert model.encode_expression(expr).shape == (8, 256)
        with pytest.raises(ConfigError, match="predict_expression needs method 'regression'"):
            model.predict_expression(images)
    if method == "cmrcnet":
        assert model.reconstruct(tokens, expr).shape == (8, 256)
    else:
        with pytest.raises(ConfigError, match="has no reconstruction branch"):
            model.reconstruct(tokens, expr)


def test_forward_is_loss(tiny_config, model_batch) -> None:
    images, expr = model_batch
    model = _model(tiny_config, "bleep").eval()
    torch.testing.assert_close(model(images, expr)["loss"], model.loss(images, expr)["loss"])


def test_total_loss_is_log1p_of_the_terms(tiny_config, model_batch) -> None:
    images, expr = model_batch
    model = _model(tiny_config, "bleep").eval()
    with torch.no_grad():
        img_emb = model.embed_images(images)
        spot_emb = model.encode_expression(expr)
        logits = spot_emb @ img_emb.T
        targets = torch.softmax((img_emb @ img_emb.T + spot_emb @ spot_emb.T) / 2, dim=-1)
        per_sample = (
            -(targets * logits.log_softmax(-1)).sum(-1) - (targets.T * logits.T.log_softmax(-1)).sum(-1)
        ) / 2
        expected = torch.log1p(per_sample).mean()
        torch.testing.assert_close(model.loss(images, expr)["loss"], expected)
        plain = _model(tiny_config, "bleep", log1p_losses=False).eval()
        assert plain.loss(images, expr)["loss"].item() == pytest.approx(per_sample.mean().item(), rel=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_loss_goes_down_on_a_fixed_batch(tiny_config, model_batch, method: str) -> None:
    images, expr = model_batch
    model = _model(tiny_config, method).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        loss = model.loss(images, expr)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 < 0.8 * sum(history[:3]) / 3, history


def test_reconstruction_target_can_be_detached(tiny_config, model_batch) -> None:
    images, expr = model_batch
    grads = {}
    for detach in (False, True):
        model = _model(tiny_config, "cmrcnet", detach_recon_target=detach)
        model.loss(images, expr)["reconstruction"].backward()
        grads[detach] = model.image_projection.fc.weight.grad
    assert grads[False].abs().sum() > 0
    assert grads[True] is None or grads[True].abs().sum() == 0



def test_recon_weight_scales_the_reconstruction_term(tiny_config, model_batch) -> None:
    images, expr = model_batch
    model = _model(tiny_config, "cmrcnet", recon_weight=4.0).eval()  # eval: no dropout, same mask seed below
    torch.manual_seed(1)
    losses = model.loss(images, expr)
    torch.testing.assert_close(losses["loss"], losses["contrastive"] + 4.0 * losses["reconstruction"])
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match="recon_weight"):
            tiny_config("cmrcnet", recon_weight=bad)

@pytest.mark.parametrize("mask_mode", ["element", "token"])
@pytest.mark.parametrize("share", [True, False])
def test_reconstruction_variants_train(tiny_config, model_batch, mask_mode: str, share: bool) -> None:
    images, expr = model_batch
    model = _model(tiny_config, "cmrcnet", mask_mode=mask_mode, share_fusion_weights=share)
    model.loss(images, expr)["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_shared_and_unshared_fusion_parameter_counts(tiny_config) -> None:
    shared = sum(p.numel() for p in _model(tiny_config, "cmrcnet").parameters())
    unshared = sum(p.numel() for p in _model(tiny_config, "cmrcnet", share_fusion_weights=False).parameters())
    assert unshared > shared


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_gives_finite_fp32_losses(tiny_config, model_batch, method: str) -> None:
    images, expr = model_batch
    model = _model(tiny_config, method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.loss(images.contiguous(memory_format=torch.channels_last), expr)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_with_weights_only(tiny_config, model_batch, method: str) -> None:
    images, expr = model_batch
    model = _model(tiny_config, method).eval()
    buffer = io.BytesIO()
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    torch.manual_seed(123)  # a different initialisation, overwritten by the load
    restored = build_model(ModelConfig.from_dict(checkpoint["config"]))
    restored.load_state_dict(checkpoint["state_dict"])
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored.embed_images(images), model.embed_images(images))
        if method == "regression":
            torch.testing.assert_close(restored.predict_expression(images), model.predict_expression(images))
        else:
            torch.testing.assert_close(restored.encode_expression(expr), model.encode_expression(expr))


def test_eval_mode_embeddings_are_deterministic(tiny_config, model_batch) -> None:
    images, expr = model_batch
    model = _model(tiny_config, "cmrcnet").eval()
    with torch.no_grad():
        torch.testing.assert_close(model.embed_images(images), model.embed_images(images))
        torch.testing.assert_close(model.encode_expression(expr), model.encode_expression(expr))


def test_wrong_gene_count_is_a_clear_error(tiny_config, model_batch) -> None:
    images, _ = model_batch
    model = _model(tiny_config, "cmrcnet")
    with pytest.raises(ConfigError, match=r"expression must be \(B, 12\)"):
        model.loss(images, torch.rand(8, 13))


def _vit_parameters(img: int, patch: int, width: int, depth: int) -> int:
    """ViT parameter count written out: patch conv, class token, positions, blocks, final norm."""
    n_tokens = 1 + (img // patch) ** 2
    block = (
        (width * 3 * width + 3 * width)
        + (width * width + width)
        + 2 * (width * 4 * width)
        + 5 * width
        + 4 * width
    )
    return (3 * patch * patch * width + width) + width + n_tokens * width + depth * block + 2 * width


@pytest.mark.parametrize("preset", ["paper", "cpu"])
def test_full_size_presets_build_and_encode(preset: str) -> None:
    cfg = ModelConfig.from_preset(preset, n_genes=50, method="bleep")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    n_vit = sum(p.numel() for p in model.image_encoder.parameters())
    assert n_vit == _vit_parameters(cfg.img_size, cfg.patch_size, cfg.width, cfg.depth)
    with torch.no_grad():
        tokens, img_emb = model.encode_image(torch.randn(1, 3, cfg.img_size, cfg.img_size))
    assert tokens.shape == (1, cfg.n_tokens, cfg.width)
    assert img_emb.shape == (1, 256)
    if preset == "paper":
        assert tokens.shape == (1, 50, 768)
        assert 55e6 < n_vit < 62e6
