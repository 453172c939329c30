"""Analytic FLOP counts, for comparing measured throughput with a machine's matmul peak.

Only matrix multiplications (linear layers, the patch convolution, attention scores and weighted sums, the
contrastive similarity matrices) are counted, at 2 FLOPs per multiply-add; normalisations, activations, softmax
and elementwise ops are ignored (a few percent for these shapes). Training counts forward + backward as 3x the
forward pass.
"""

from __future__ import annotations

import logging

from cmrcnet.errors import ConfigError
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.handcrafted import N_FEATURES

logger = logging.getLogger(__name__)


def _linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def _attention(n_query: int, n_key: int, dim: int) -> int:
    """Scores (q @ k.T) and weighted sum (attn @ v) over all heads, projections excluded."""
    return 2 * (2 * n_query * n_key * dim)


def _transformer_block(tokens: int, dim: int, mlp_ratio: float) -> int:
    hidden = int(dim * mlp_ratio)
    return (
        _linear(tokens, dim, 3 * dim)  # qkv
        + _attention(tokens, tokens, dim)
        + _linear(tokens, dim, dim)  # output projection
        + _linear(tokens, dim, hidden)
        + _linear(tokens, hidden, dim)
    )


def _projection_head(d_in: int, d_out: int) -> int:
    return _linear(1, d_in, d_out) + _linear(1, d_out, d_out)


def model_flops_per_spot(config: ModelConfig, *, training: bool = True, batch_size: int = 64) -> int:
    """Approximate matmul FLOPs per spot of one `loss` call (x3 when `training`).

    `batch_size` matters only for the contrastive loss, whose (B, B) similarity matrices cost O(B) per spot.
    Counted for the ViT encoder ("vit-cmrcnet") only. With a frozen encoder a training step costs only the heads
    (3x their forward): the trainer computes the encoder's outputs once, before the first epoch, and caches them.
    """
    c = config
    if c.image_encoder != "vit-cmrcnet":
        raise ConfigError(f"FLOPs are counted for the vit-cmrcnet encoder only, not {c.image_encoder!r}")
    t = c.n_tokens
    d = c.proj_dim
    encoder = _linear(c.n_patches, 3 * c.patch_size**2, c.width)  # patch embedding
    encoder += c.depth * _transformer_block(t, c.width, c.mlp_ratio)
    width = c.width + (N_FEATURES if c.handcrafted_features else 0)
    flops = _projection_head(width, d)  # image embedding
    if c.method == "regression":
        flops += _linear(1, d, c.regression_hidden) + _linear(1, c.regression_hidden, c.n_genes)
    else:
        flops += _projection_head(c.n_genes, d)  # spot embedding
        flops += 3 * _linear(1, d, batch_size)  # logits, image and spot similarity rows
    if c.method == "cmrcnet":
        k = c.n_expr_tokens
        flops += _linear(1, c.n_genes, k * d)  # expression tokens
        flops += _linear(t, c.width, d)  # image tokens
        flops += _linear(t, d, d) + _linear(k, d, 2 * d) + _attention(t, k, d) + _linear(t, d, d)
        fusion = (
            _transformer_block(t, d, 4.0)
            + _linear(t, d, d)  # query MLP
            + _linear(k, d, d)  # key MLP
            + _linear(t, d, d)  # query-side values
            + _linear(k, d, d)  # context values
            + _attention(t, k, d)
        )
        flops += c.n_fusion_blocks * fusion
    if not training:
        return encoder + flops
    return 3 * flops if c.freeze_encoder else 3 * (encoder + flops)
