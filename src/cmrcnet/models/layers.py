"""Building blocks shared by the image encoder and the reconstruction branch."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, D) -> (B, heads, N, D / heads)."""
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)  # (B, heads, N, D / heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, heads * d)


class ProjectionHead(nn.Module):
    """METHOD.md step 2: Linear(in, D) -> GELU -> Linear(D, D) -> Dropout -> + first Linear's output -> LayerNorm."""

    def __init__(self, *, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(F.gelu(projected)))
        return self.norm(x + projected)


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, *, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and F.scaled_dot_product_attention."""

    def __init__(self, *, dim: int, heads: int, dropout: float, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads)  # (B, N, 3, heads, D / heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, D / heads)
        out = merge_heads(F.scaled_dot_product_attention(q, k, v))  # (B, N, D)
        return self.dropout(self.proj(out))


class CrossAttention(nn.Module):
    """Standard multi-head attention: queries from one sequence, keys = values from another.

    Initialised as torch's nn.MultiheadAttention and the reference's copy of it: the query, key and value
    projections are one (3 dim, dim) matrix drawn xavier-uniform as a whole (bound sqrt(6 / (4 dim))), split
    here into `q` (its first dim rows) and `kv` (the rest); input biases 0; output projection torch's default
    Linear weights with bias 0. Computed with F.scaled_dot_product_attention on batch-first tensors.
    """

    def __init__(self, *, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        in_proj = torch.empty(3 * self.q.in_features, self.q.in_features)  # (3 dim, dim), as one matrix
        nn.init.xavier_uniform_(in_proj)
        dim = self.q.out_features
        with torch.no_grad():
            self.q.weight.copy_(in_proj[:dim])
            self.kv.weight.copy_(in_proj[dim:])
        self.proj.reset_parameters()
        for layer in (self.q, self.kv, self.proj):
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) queries; context: (B, M, D) keys and values. Returns (B, N, D)."""
        b, m, d = context.shape
        q = split_heads(self.q(x), self.heads)  # (B, heads, N, D / heads)
        kv = self.kv(context).view(b, m, 2, self.heads, d // self.heads)  # (B, M, 2, heads, D / heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, heads, M, D / heads)
        out = merge_heads(F.scaled_dot_product_attention(q, k, v))  # (B, N, D)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self, *, dim: int, heads: int, mlp_ratio: float, dropout: float, norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim=dim, heads=heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio), dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
