"""CONCH v1's image tower (Lu et al. 2024, mahmoodlab/CONCH `open_clip_custom`), in plain PyTorch.

The tower is a timm ViT-B/16 trunk (448 px, no LayerScale) followed by two attentional poolers (learned queries
attending over the trunk's tokens with `nn.MultiheadAttention`): `attn_pool_contrast` (one query, 512 wide) feeds
`ln_contrast` and the contrastive projection `proj_contrast`; `attn_pool_caption` (256 queries, 768 wide) feeds
the captioning decoder. Names follow the vendor's checkpoint with its `visual.` prefix removed; the text tower's
tensors in the same file are reported as unexpected and ignored.

The embedding is the vendor's recommended feature for downstream tasks, `encode_image(proj_contrast=False,
normalize=False)`: the contrastive pooler's output after `ln_contrast`, 512 wide.
"""

from __future__ import annotations

import torch
from torch import nn

from cmrcnet.models.foundation.base import FoundationBackbone
from cmrcnet.models.foundation.timm_vit import TimmViT


class AttentionalPooler(nn.Module):
    """`query` (n_queries, d_model) attends over LayerNorm-ed context tokens: `ln_q`, `ln_k`, `attn`."""

    def __init__(self, *, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(
            d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, context_dim) -> pooled queries (B, n_queries, d_model)."""
        k = self.ln_k(x)  # (B, N, context_dim)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, n_queries, d_model)
        return self.attn(q, k, k, need_weights=False)[0]  # (B, n_queries, d_model)


class ConchVisual(FoundationBackbone):
    """CONCH's `visual` module; `forward` returns the 512-d contrastive-pooler embedding as one token (B, 1, 512)."""

    def __init__(
        self,
        *,
        img_size: int = 448,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        embed_dim_contrast: int = 512,
        embed_dim_caption: int = 768,
        pooler_heads: int = 8,
        n_queries_caption: int = 256,
        mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073),
        std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711),
    ) -> None:
        super().__init__(mean=mean, std=std)
        self.out_dim = embed_dim_contrast
        # the trunk receives vendor-normalised images from this module, so its own normalisation is the identity
        self.trunk = TimmViT(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=width,
            depth=depth,
            num_heads=heads,
            pool="tokens",
        )
        self.attn_pool_contrast = AttentionalPooler(
            d_model=embed_dim_contrast, context_dim=width, n_head=pooler_heads, n_queries=1
        )
        self.ln_contrast = nn.LayerNorm(embed_dim_contrast)
        self.proj_contrast = nn.Parameter(width**-0.5 * torch.randn(embed_dim_contrast, embed_dim_contrast))
        self.attn_pool_caption = AttentionalPooler(
            d_model=embed_dim_caption, context_dim=width, n_head=pooler_heads, n_queries=n_queries_caption
        )
        self.ln_caption = nn.LayerNorm(embed_dim_caption)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_tokens(self.renormalise(images))  # (B, 1 + h * w, width)
        pooled = self.attn_pool_contrast(tokens)  # (B, 1, 512)
        return self.ln_contrast(pooled)  # (B, 1, 512)
