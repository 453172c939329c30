"""The ViT image encoder and the uint8 -> float helper."""

from __future__ import annotations

import pytest
import torch

from cmrcnet.errors import ConfigError
from cmrcnet.models import IMAGENET_MEAN, IMAGENET_STD, VisionTransformer, images_to_float


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, width=32, depth=2, heads=2).eval()


def test_outputs_all_tokens_class_token_first() -> None:
    tokens = _tiny_vit()(torch.randn(3, 3, 32, 32))
    assert tokens.shape == (3, 1 + 16, 32)
    assert torch.isfinite(tokens).all()


def test_channels_last_input_gives_the_same_tokens() -> None:
    vit = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit(x.contiguous(memory_format=torch.channels_last)), vit(x))


def test_initialisation() -> None:
    vit = _tiny_vit()
    assert 0.01 < vit.pos_embed.std().item() < 0.03
    assert vit.pos_embed.abs().max().item() <= 0.04 + 1e-6  # truncated at 2 std
    for block in vit.blocks:
        assert torch.all(block.attn.qkv.bias == 0)
        assert torch.all(block.norm1.weight == 1) and torch.all(block.norm1.bias == 0)


def test_wrong_image_size_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="image size 64x64 does not match the model's img_size 32"):
        _tiny_vit()(torch.randn(1, 3, 64, 64))
    with pytest.raises(ConfigError, match=r"images must be \(B, 3, H, W\)"):
        _tiny_vit()(torch.randn(1, 32, 32, 3))


def test_images_to_float_nhwc_and_nchw_agree() -> None:
    g = torch.Generator().manual_seed(0)
    nhwc = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8, generator=g)
    a = images_to_float(nhwc)
    b = images_to_float(nhwc.permute(0, 3, 1, 2).contiguous())
    assert a.shape == (2, 3, 8, 8) and a.dtype == torch.float32
    assert a.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b)
    expected = (nhwc[0, 1, 2, 0].item() / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert a[0, 0, 1, 2].item() == pytest.approx(expected, rel=1e-5)


def test_images_to_float_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="uint8"):
        images_to_float(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="cannot tell the channel axis"):
        images_to_float(torch.zeros(1, 3, 8, 3, dtype=torch.uint8))
    assert images_to_float(torch.zeros(1, 3, 8, 3, dtype=torch.uint8), layout="nchw").shape == (1, 3, 8, 3)
