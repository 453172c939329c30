"""Vision Transformers in timm's `VisionTransformer` parameter layout, in plain PyTorch.

UNI, UNI2-h, H-optimus-0/1, Virchow2, Prov-GigaPath and CONCH's image trunk are all timm ViTs; their weight files
use timm's names (`patch_embed.proj`, `cls_token`, `reg_token`, `pos_embed`, `blocks.{i}.{norm1,attn.qkv,attn.proj,
ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}`, `norm`), which the modules here reproduce name for name, so a vendor's
file loads without renaming. The options cover what these models use:

- patch size 14 or 16 (a convolution whose stride equals its kernel);
- LayerScale (`init_values`: a learned per-channel scale on each residual branch, `ls1.gamma`, `ls2.gamma`);
- register tokens (`reg_tokens`, after the class token) and `no_embed_class` (the position embedding covers the
  patches only; class and register tokens are concatenated after it is added);
- the plain GELU MLP or timm's `SwiGLUPacked` (one `fc1` producing value and gate halves: silu(first) * second);
- bicubic interpolation of the position embedding for inputs of another size (timm's `dynamic_img_size`).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from cmrcnet.errors import ConfigError
from cmrcnet.models.foundation.base import FoundationBackbone

logger = logging.getLogger(__name__)

POOLS = ("token", "token+mean", "tokens")


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int], n_prefix: int) -> torch.Tensor:
    """Position embedding (1, n_prefix + h * w, D) of a square h x w grid -> one for `grid`, bicubic with
    antialiasing in float32 (timm's `resample_abs_pos_embed`); the first `n_prefix` entries are kept as they are."""
    n_old = pos.shape[1] - n_prefix
    side = math.isqrt(n_old)
    if (side, side) == tuple(grid):
        return pos
    prefix, patches = pos[:, :n_prefix], pos[:, n_prefix:]
    d = pos.shape[-1]
    x = patches.float().reshape(1, side, side, d).permute(0, 3, 1, 2)  # (1, D, side, side)
    x = F.interpolate(x, size=grid, mode="bicubic", antialias=True)  # (1, D, gh, gw)
    x = x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(pos.dtype)  # (1, gh * gw, D)
    return torch.cat([prefix, x], dim=1)


class PatchEmbed(nn.Module):
    """`patch_embed.proj`: non-overlapping patches -> tokens (B, h, w, D)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).permute(0, 2, 3, 1)  # (B, H / patch, W / patch, D)


class Attention(nn.Module):
    """`attn.qkv` (fused, with bias) and `attn.proj`; F.scaled_dot_product_attention in between."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)  # (B, N, 3, heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class Mlp(nn.Module):
    """`mlp.fc1` -> GELU -> `mlp.fc2` (timm `Mlp`)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUPacked(nn.Module):
    """`mlp.fc1` (dim -> hidden, value and gate halves packed in one matrix) -> silu(value) * gate -> `mlp.fc2`
    (hidden / 2 -> dim): timm's `GluMlp` with SiLU and `gate_last=False`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        if hidden % 2:
            raise ConfigError(f"a packed SwiGLU MLP needs an even hidden width, got {hidden}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)  # each (B, N, hidden / 2)
        return self.fc2(F.silu(value) * gate)


class LayerScale(nn.Module):
    """`gamma`: a learned per-channel scale of a residual branch (Touvron et al. 2021, CaiT)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))."""

    def __init__(
        self, *, dim: int, heads: int, hidden: int, swiglu: bool, init_values: float | None, eps: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SwiGLUPacked(dim, hidden) if swiglu else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmViT(FoundationBackbone):
    """timm's VisionTransformer (no classifier head), returning the vendor's embedding as one token.

    `pool` chooses the output: "token" the class token after the final norm (B, 1, D); "token+mean" the class
    token concatenated with the mean of the patch tokens, registers excluded (Virchow2; B, 1, 2D); "tokens" every
    token after the final norm (B, 1 + registers + patches, D; used as a trunk).
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        swiglu: bool = False,
        init_values: float | None = None,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        pool: str = "token",
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        eps: float = 1e-6,
    ) -> None:
        super().__init__(mean=mean, std=std)
        if pool not in POOLS:
            raise ConfigError(f"unknown pool {pool!r}; choose one of {list(POOLS)}")
        if embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.n_prefix = 1 + reg_tokens
        self.no_embed_class = no_embed_class
        self.pool = pool
        self.out_dim = 2 * embed_dim if pool == "token+mean" else embed_dim
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = self.grid**2 + (0 if no_embed_class else self.n_prefix)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        hidden = int(embed_dim * mlp_ratio)  # timm's rounding
        self.blocks = nn.Sequential(
            *(
                Block(
                    dim=embed_dim,
                    heads=num_heads,
                    hidden=hidden,
                    swiglu=swiglu,
                    init_values=init_values,
                    eps=eps,
                )
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Vendor-normalised images (B, 3, H, W) -> tokens before the blocks (B, 1 + registers + h * w, D)."""
        x = self.patch_embed(x)  # (B, h, w, D)
        b, h, w, d = x.shape
        pos = resample_pos_embed(self.pos_embed, (h, w), 0 if self.no_embed_class else self.n_prefix)
        x = x.reshape(b, h * w, d)  # (B, h * w, D)
        prefix = [self.cls_token.expand(b, -1, -1)]  # (B, 1, D)
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))  # (B, registers, D)
        if self.no_embed_class:
            return torch.cat([*prefix, x + pos], dim=1)  # (B, 1 + registers + h * w, D)
        return torch.cat([*prefix, x], dim=1) + pos  # (B, 1 + registers + h * w, D)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Vendor-normalised images -> every token after the final norm (B, 1 + registers + h * w, D)."""
        return self.norm(self.blocks(self.embed(x)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images normalised as the rest of cmrcnet does (ImageNet constants) -> (B, 1, out_dim); see `pool`."""
        x = self.forward_tokens(self.renormalise(images))  # (B, N, D)
        if self.pool == "tokens":
            return x
        if self.pool == "token+mean":
            patches = x[:, self.n_prefix :].mean(dim=1)  # (B, D), registers excluded
            return torch.cat([x[:, 0], patches], dim=-1).unsqueeze(1)  # (B, 1, 2D)
        return x[:, :1]  # (B, 1, D)
