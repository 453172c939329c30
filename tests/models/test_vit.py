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


def _init_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=8, width=64, depth=2, heads=2)


def test_linear_layers_start_normal_0_01_with_zero_bias() -> None:
    """The reference (CMRCNet `_init_vit_weights`): every Linear of the ViT N(0, 0.01), biases 0."""
    linears = [m for m in _init_vit().modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4  # qkv, proj, fc1, fc2 per block
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.01, rel=0.02)
    assert weights.abs().max().item() > 0.04  # a plain normal, not truncated at 2 std
    assert all(torch.all(m.bias == 0) for m in linears)


def test_patch_convolution_starts_kaiming_normal_fan_out() -> None:
    conv = _init_vit().patch_embed.proj
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]  # 64 * 8 * 8
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.03)
    assert torch.all(conv.bias == 0)


def test_tokens_start_normal_0_02_and_norms_at_identity() -> None:
    vit = _init_vit()
    both = torch.cat([vit.pos_embed.detach().flatten(), vit.cls_token.detach().flatten()])
    assert both.std().item() == pytest.approx(0.02, rel=0.06)
    assert both.abs().max().item() > 0.045  # not truncated at 2 std
    norms = [m for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)


def test_residual_stream_stays_fp32_under_bf16_autocast() -> None:
    vit = _tiny_vit()
    seen: list[torch.dtype] = []
    hooks = [
        b.register_forward_hook(lambda _m, inp, out: seen.extend([inp[0].dtype, out.dtype]))
        for b in vit.blocks
    ]
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = vit(x)
    for h in hooks:
        h.remove()
    assert seen == [torch.float32] * (2 * len(vit.blocks))  # every block's input and output
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens, vit(x), atol=0.1, rtol=0.05)  # bf16 branches, fp32 stream


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


def test_a_model_cast_to_bf16_as_a_whole_still_runs() -> None:
    vit = _tiny_vit().to(torch.bfloat16)
    tokens = vit(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert tokens.dtype == torch.bfloat16 and torch.isfinite(tokens.float()).all()
