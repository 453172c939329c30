"""Encoder registry, plug-in weights (locally made, never downloaded), handcrafted features, frozen encoders."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cmrcnet.errors import CheckpointError, ConfigError
from cmrcnet.models import build_model
from cmrcnet.models.encoders import ARCHITECTURES, ResNetEncoder, build_image_encoder, load_encoder_weights
from cmrcnet.models.handcrafted import N_FEATURES, HandcraftedFeatures, handcrafted_features
from cmrcnet.models.preprocess import images_to_float


def test_registry_builds_every_architecture_with_the_documented_interface(tiny_config) -> None:
    for name, arch in ARCHITECTURES.items():
        if arch.foundation is not None:  # vendor models have their own layout tests (test_foundation_encoders.py)
            continue
        cfg = tiny_config(image_encoder=name)
        encoder = build_image_encoder(cfg)
        tokens = encoder(torch.randn(2, 3, cfg.img_size, cfg.img_size))
        assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[2] == encoder.out_dim


def test_unknown_architecture_is_a_config_error(tiny_config) -> None:
    with pytest.raises(ConfigError, match="unknown image_encoder 'vgg'"):
        tiny_config(image_encoder="vgg")


def test_resnet50_has_torchvision_shapes() -> None:
    enc = ResNetEncoder()
    n_params = sum(p.numel() for p in enc.parameters())
    assert n_params == 23_508_032  # torchvision's resnet50 without its 1000-class fc layer
    assert enc(torch.randn(1, 3, 224, 224)).shape == (1, 49, 2048)
    assert "layer3.5.bn3.running_var" in enc.state_dict()


def _weights_of(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in module.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_plug_in_weights_load_with_wrapper_prefixes_and_extra_heads(tmp_path: Path, suffix: str) -> None:
    enc = ResNetEncoder()
    made = _weights_of(enc, 1)
    on_disk = {f"module.backbone.{k}": v for k, v in made.items()}
    on_disk["module.backbone.fc.weight"] = torch.randn(10, 2048)  # a classifier the encoder has no place for
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(on_disk, str(path))
    else:
        torch.save({"state_dict": on_disk, "epoch": 3}, path)
    report = load_encoder_weights(enc, path)
    assert report.loaded == len(made) and report.missing == [] and report.unexpected == ["fc.weight"]
    for k, v in enc.state_dict().items():
        assert torch.equal(v, made[k].to(v.dtype)), k
    assert len(report.sha256) == 64


def test_weights_of_another_architecture_are_refused(tmp_path: Path, tiny_config) -> None:
    vit = build_image_encoder(tiny_config())
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="only 0 of the encoder's"):
        load_encoder_weights(ResNetEncoder(), path)
    bigger = build_image_encoder(tiny_config(width=64, encoder="custom"))
    with pytest.raises(CheckpointError, match="do not fit this encoder's architecture"):
        load_encoder_weights(bigger, path)
    with pytest.raises(CheckpointError, match="exactly"):
        load_encoder_weights(vit, _extra(tmp_path, vit), strict=True)


def _extra(tmp_path: Path, module: torch.nn.Module) -> Path:
    path = tmp_path / "extra.safetensors"
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    state["head.weight"] = torch.zeros(2)
    save_file(state, str(path))
    return path


class _Boom:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_weights_files_cannot_run_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": {"x": _Boom()}}))
    with pytest.raises(CheckpointError, match="only plain tensors"):
        load_encoder_weights(ResNetEncoder(), path)
    assert "pickle code ran" not in capsys.readouterr().out


def test_handcrafted_features_are_invariant_to_flips_and_quarter_turns() -> None:
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(3, 48, 48, 3, generator=g) * 255).to(torch.uint8)
    base = handcrafted_features(images_to_float(img))
    assert base.shape == (3, N_FEATURES) and torch.isfinite(base).all()
    for variant in (img.flip(2), img.flip(1), torch.rot90(img, 1, dims=(1, 2)), torch.rot90(img, 3, dims=(1, 2))):
        assert torch.allclose(handcrafted_features(images_to_float(variant.contiguous())), base, atol=1e-5)
    darker = handcrafted_features(images_to_float((img // 2).contiguous()))
    assert (darker[:, 6:9] > base[:, 6:9]).all()  # more optical density


def test_handcrafted_standardisation_is_fitted_and_saved(tiny_config) -> None:
    raw = torch.randn(50, N_FEATURES) * 3 + 7
    raw[:, 0] = 1.0  # a constant feature: centred, not divided by zero
    hf = HandcraftedFeatures()
    hf.fit(raw)
    z = hf.standardise(raw)
    assert torch.allclose(z.mean(0), torch.zeros(N_FEATURES), atol=1e-4)
    assert torch.isfinite(z).all() and int(hf.fitted) == 1
    model = build_model(tiny_config(handcrafted_features=True))
    assert {"handcrafted.mean", "handcrafted.std", "handcrafted.fitted"} <= set(model.state_dict())


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval_mode(tiny_config, model_batch) -> None:
    images, expr = model_batch
    model = build_model(tiny_config(freeze_encoder=True, handcrafted_features=True, dropout=0.1, encoder="custom"))
    model.train()
    assert not model.image_encoder.training and model.image_projection.training
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(images, expr)["loss"].backward()
    opt.step()
    assert all(p.grad is None for p in model.image_encoder.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.image_encoder.state_dict().items())
    assert model.image_projection.projection.weight.grad is not None


def test_precomputed_tokens_give_the_same_loss_as_images(tiny_config, model_batch) -> None:
    images, expr = model_batch
    model = build_model(tiny_config(handcrafted_features=True, mask_in_eval=False)).eval()
    tokens = model.encode_tokens(images)
    features = model.image_features(images)
    with torch.no_grad():
        a = model.loss(images, expr)["loss"]
        b = model.loss(None, expr, tokens=tokens, features=features)["loss"]
        pooled = model.loss(None, expr, tokens=tokens.mean(1, keepdim=True), features=features)["contrastive"]
    assert torch.allclose(a, b) and torch.allclose(model.loss(images, expr)["contrastive"], pooled)
