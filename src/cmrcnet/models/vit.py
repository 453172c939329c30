"""The image encoder: a Vision Transformer trained from scratch (METHOD.md step 1)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from cmrcnet.errors import ConfigError
from cmrcnet.models.layers import TransformerBlock

logger = logging.getLogger(__name__)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with a convolution whose stride equals its kernel."""

    def __init__(self, *, img_size: int, patch_size: int, width: int, in_chans: int = 3) -> None:
        super().__init__()
        self.img_size = img_size
        self.n_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.proj.in_channels:
            raise ConfigError(
                f"images must be (B, {self.proj.in_channels}, H, W) float tensors, got shape {tuple(images.shape)}"
            )
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ConfigError(
                f"image size {images.shape[-2]}x{images.shape[-1]} does not match the model's img_size "
                f"{self.img_size}"
            )
        # works for contiguous and channels_last inputs alike
        x = self.proj(images)  # (B, width, H / patch, W / patch)
        return x.flatten(2).transpose(1, 2)  # (B, n_patches, width)


class VisionTransformer(nn.Module):
    """ViT: patch embedding, class token, learned position embedding, pre-norm blocks, final LayerNorm.

    `forward` returns all tokens, class token first: (B, 1 + n_patches, width).
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.width = width
        self.out_dim = width  # token width (the encoder interface, models/encoders.py)
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, width=width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.n_patches, width))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim=width, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, norm_eps=1e-6)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's initialisation (ngfufdrdh/CMRCNet `model/vit_model.py`, after timm's original ViT):

        - Linear weights N(0, 0.01), biases 0;
        - the patch-embedding convolution kaiming-normal (fan_out, ReLU gain: std sqrt(2 / (width * patch^2))),
          bias 0;
        - class token and position embedding N(0, 0.02);
        - LayerNorm weight 1, bias 0.

        The reference calls `trunc_normal_(t, std=s)` with torch's default bounds of +-2 (absolute, not multiples
        of s), which for s <= 0.02 is a plain normal; we write it as one.
        """
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, img_size, img_size) normalised floats (see `images_to_float`).

        The residual stream stays in the parameters' dtype (fp32) under autocast, as in the reference: the patch
        embedding's low-precision output joins the fp32 class token and position embedding, each block adds its
        (low-precision) branch outputs to the fp32 stream, and the LayerNorms run on fp32 inputs.
        """
        stream = self.pos_embed.dtype  # fp32, or the weights' own dtype for a model cast to bf16 as a whole
        x = self.patch_embed(images).to(stream)  # (B, n_patches, width)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, width)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + n_patches, width)
        x = self.pos_drop(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
