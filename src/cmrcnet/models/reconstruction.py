"""Cross-modal masked reconstruction (METHOD.md step 5), the paper's pretext task.

Image tokens are masked, then rebuilt with the help of the spot's expression: a cross-attention from the masked
image tokens to expression tokens, then fusion blocks (self-attention + MLP on the image stream, then a
cross-attention to the expression tokens whose output is added). The mean of the resulting tokens is trained
to match the image embedding.

Decisions (following the reference code, github ngfufdrdh/CMRCNet, `model/models.py`):
- Masking keeps each element with probability `keep_prob` and zeroes the rest, without rescaling the kept
  values (unlike dropout). The reference masks whenever the loss is computed, in eval mode too (its validation
  loss is masked); `mask_in_eval=False` masks in training mode only.
- The first cross-attention's output replaces the image stream (no residual), as in the reference.
- The fusion cross-attention is the reference's variant (`FusionCrossAttention`), not a standard one.
- With `share_fusion_weights` one block is applied n times (the reference builds its ModuleList from one
  object, so its blocks share weights); it is stored once, so the state_dict has no aliased entries.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from cmrcnet.models.layers import CrossAttention, TransformerBlock, merge_heads, split_heads

logger = logging.getLogger(__name__)


def random_mask(x: torch.Tensor, *, keep_prob: float, mode: str = "element") -> torch.Tensor:
    """Zero random parts of tokens x (B, T, D); kept values are not rescaled.

    mode "element": each of the B*T*D values is kept with probability keep_prob (the reference).
    mode "token": each of the B*T tokens is kept (all D values) with probability keep_prob.
    """
    if keep_prob >= 1.0:
        return x
    if mode not in ("element", "token"):
        raise ValueError(f"mode must be 'element' or 'token', got {mode!r}")
    b, t, d = x.shape
    shape = (b, t, d) if mode == "element" else (b, t, 1)
    keep = torch.rand(shape, device=x.device) < keep_prob  # (B, T, D) or (B, T, 1)
    return x * keep.to(x.dtype)


class ExpressionTokenizer(nn.Module):
    """Expression (B, G) -> Linear(G, n_tokens * dim) -> ELU -> AlphaDropout -> (B, n_tokens, dim).

    AlphaDropout (as the reference's "SNN block") keeps the ELU outputs' mean and variance in training and is
    the identity in eval mode.
    """

    def __init__(self, *, n_genes: int, n_tokens: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.n_tokens = n_tokens
        self.linear = nn.Linear(n_genes, n_tokens * dim)
        self.dropout = nn.AlphaDropout(dropout)

    def forward(self, expr: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.elu(self.linear(expr)))  # (B, n_tokens * dim)
        return x.view(x.shape[0], self.n_tokens, -1)  # (B, n_tokens, dim)


class FusionCrossAttention(nn.Module):
    """The reference's cross-attention from the image stream x to the expression tokens y.

    q = ReLU-MLP(x), k = ReLU-MLP(y) (Linear -> ReLU -> Dropout each); values are linear maps of k, and the
    output adds a linear map of q: out = W1 q + MultiHead(q, k, W2 k). There is no output projection.
    """

    def __init__(self, *, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.k = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.v_query = nn.Linear(dim, dim)
        self.v_context = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D); context: (B, M, D). Returns (B, N, D)."""
        q = self.q(x)  # (B, N, D)
        k = self.k(context)  # (B, M, D)
        attended = F.scaled_dot_product_attention(
            split_heads(q, self.heads),  # (B, heads, N, D / heads)
            split_heads(k, self.heads),  # (B, heads, M, D / heads)
            split_heads(self.v_context(k), self.heads),  # (B, heads, M, D / heads)
        )
        return self.v_query(q) + merge_heads(attended)  # (B, N, D)


class FusionBlock(nn.Module):
    """Pre-norm self-attention + pre-norm MLP on the image stream, then x + FusionCrossAttention(x, y)."""

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float, dropout: float, qk_dropout: float) -> None:
        super().__init__()
        self.block = TransformerBlock(dim=dim, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout)
        self.cross = FusionCrossAttention(dim=dim, heads=heads, dropout=qk_dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        return x + self.cross(x, context)


class CrossModalReconstructor(nn.Module):
    """ViT tokens (B, T, width) + expression (B, G) -> reconstructed image embedding (B, dim)."""

    def __init__(
        self,
        *,
        n_genes: int,
        width: int,
        dim: int = 256,
        n_expr_tokens: int = 8,
        expr_dropout: float = 0.25,
        mask_mode: str = "element",
        mask_keep_prob: float = 0.5,
        mask_in_eval: bool = True,
        cross_heads: int = 4,
        fusion_heads: int = 8,
        n_fusion_blocks: int = 2,
        share_fusion_weights: bool = True,
        mlp_ratio: float = 4.0,
        fusion_dropout: float = 0.1,
        fusion_qk_dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.mask_mode = mask_mode
        self.mask_keep_prob = mask_keep_prob
        self.mask_in_eval = mask_in_eval
        self.expr_tokens = ExpressionTokenizer(
            n_genes=n_genes, n_tokens=n_expr_tokens, dim=dim, dropout=expr_dropout
        )
        self.image_tokens = nn.Linear(width, dim)
        self.cross = CrossAttention(dim=dim, heads=cross_heads)

        def new_block() -> FusionBlock:
            return FusionBlock(
                dim=dim,
                heads=fusion_heads,
                mlp_ratio=mlp_ratio,
                dropout=fusion_dropout,
                qk_dropout=fusion_qk_dropout,
            )

        # Shared weights: one block stored once (so state_dict has no duplicate entries) and applied
        # n_fusion_blocks times; otherwise n_fusion_blocks independent blocks.
        self.n_fusion_blocks = n_fusion_blocks
        n_stored = min(1, n_fusion_blocks) if share_fusion_weights else n_fusion_blocks
        self.fusion = nn.ModuleList(new_block() for _ in range(n_stored))

    def mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Masked copy of projected image tokens (B, T, dim); see the module docstring for when it applies."""
        if not (self.training or self.mask_in_eval):
            return tokens
        return random_mask(tokens, keep_prob=self.mask_keep_prob, mode=self.mask_mode)

    def forward(self, tokens: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        context = self.expr_tokens(expr)  # (B, n_expr_tokens, dim)
        x = self.mask(self.image_tokens(tokens))  # (B, T, dim)
        x = self.cross(x, context)  # (B, T, dim)
        for i in range(self.n_fusion_blocks):
            x = self.fusion[i % len(self.fusion)](x, context)  # (B, T, dim)
        return x.mean(dim=1)  # (B, dim)
