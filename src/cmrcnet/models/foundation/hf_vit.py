"""A ViT in the Hugging Face transformers `ViTModel` parameter layout (Phikon), in plain PyTorch.

Names, as transformers writes them: `embeddings.{cls_token, position_embeddings, patch_embeddings.projection}`,
`encoder.layer.{i}.{layernorm_before, attention.attention.{query,key,value}, attention.output.dense,
layernorm_after, intermediate.dense, output.dense}`, `layernorm`, and the optional `pooler.dense` (a tanh layer the
embedding does not use; Phikon's model card takes the class token of `last_hidden_state`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmrcnet.errors import ConfigError
from cmrcnet.models.foundation.base import FoundationBackbone
from cmrcnet.models.foundation.timm_vit import resample_pos_embed


class _Dense(nn.Module):
    """A module whose only child is `dense` (transformers' ViTSelfOutput / ViTIntermediate / ViTOutput / pooler)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _SelfAttention(nn.Module):
    """`query`, `key`, `value` projections (separate, with bias) and F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, heads, N, d)
            for p in (self.query, self.key, self.value)
        )
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)  # (B, N, D)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = _SelfAttention(dim, heads)
        self.output = _Dense(dim, dim)


class _Layer(nn.Module):
    """h = x + attention(layernorm_before(x)); out = h + output(gelu(intermediate(layernorm_after(h))))."""

    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.attention = _Attention(dim, heads)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)
        self.intermediate = _Dense(dim, hidden)
        self.output = _Dense(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention.output.dense(self.attention.attention(self.layernorm_before(x)))
        return h + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(h))))


class _Encoder(nn.Module):
    def __init__(self, layers: list[_Layer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class _PatchEmbeddings(nn.Module):
    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)


class _Embeddings(nn.Module):
    def __init__(self, n_patches: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + n_patches, dim))
        self.patch_embeddings = _PatchEmbeddings(patch_size, dim)


class HFViT(FoundationBackbone):
    """transformers' ViTModel; `forward` returns the class token of the last hidden state, (B, 1, hidden)."""

    optional_tensors = ("pooler.",)

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        intermediate_size: int,
        layer_norm_eps: float,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__(mean=mean, std=std)
        if hidden_size % num_attention_heads:
            raise ConfigError(f"hidden_size {hidden_size} is not divisible by heads {num_attention_heads}")
        self.out_dim = hidden_size
        n_patches = (img_size // patch_size) ** 2
        self.embeddings = _Embeddings(n_patches, patch_size, hidden_size)
        self.encoder = _Encoder(
            [
                _Layer(hidden_size, num_attention_heads, intermediate_size, layer_norm_eps)
                for _ in range(num_hidden_layers)
            ]
        )
        self.layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.pooler = _Dense(hidden_size, hidden_size)
        nn.init.normal_(self.embeddings.position_embeddings, std=0.02)
        nn.init.normal_(self.embeddings.cls_token, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        x = emb.patch_embeddings.projection(self.renormalise(images))  # (B, D, h, w)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h * w, D)
        x = torch.cat([emb.cls_token.expand(b, -1, -1), x], dim=1)  # (B, 1 + h * w, D)
        x = x + resample_pos_embed(emb.position_embeddings, (h, w), 1)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)[:, :1]  # (B, 1, D)
