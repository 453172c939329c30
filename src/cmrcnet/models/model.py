"""CMRCNet and its baselines as one module whose forward pass is split into named stages.

    encode_image(images) -> (tokens, img_emb)      METHOD.md steps 1-2
    encode_expression(expr) -> spot_emb            step 3
    reconstruct(tokens, expr) -> recon             step 5
    loss(images, expr) -> dict of losses           steps 4-6 (or the regression baseline's MSE)

Methods (`ModelConfig.method`): "cmrcnet" = contrastive + reconstruction; "bleep" = contrastive only;
"regression" = image embedding -> MLP -> G genes with an MSE loss. The image encoder and image projection head
are the same in all three, so embeddings and encoders are comparable across methods.

Losses (all in float32, also under autocast). With `log1p_losses` (default, the reference's form) the total is
mean(log1p(per-sample contrastive)) + recon_weight * log1p(reconstruction MSE) (`recon_weight` 1 is the
reference's; the `cpu` run preset uses 3; `recon_loss="relative"` scores the reconstruction with
`losses.relative_reconstruction_loss` instead of the MSE); the "bleep" method uses the same log1p form so
that its contrastive term is directly comparable with "cmrcnet"'s; `log1p_losses=False` gives plain means
(BLEEP's original loss). The regression MSE is never log-transformed.

Distributed training passes `gather`: a function that concatenates a (b, D) tensor from all processes with
gradients and returns (gathered (N, D), offset of this process's rows). The contrastive loss then uses global
negatives while each process computes the rows of its own spots.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from cmrcnet.errors import ConfigError
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.encoders import build_image_encoder
from cmrcnet.models.handcrafted import N_FEATURES, HandcraftedFeatures
from cmrcnet.models.layers import ProjectionHead
from cmrcnet.models.losses import contrastive_loss, mse_loss_fp32, relative_reconstruction_loss
from cmrcnet.models.reconstruction import CrossModalReconstructor

logger = logging.getLogger(__name__)


class CMRCNet(nn.Module):
    """Image encoder + projection heads (+ reconstruction branch or regression head), per `config.method`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.image_encoder = build_image_encoder(config)
        width = int(self.image_encoder.out_dim)
        self.handcrafted: HandcraftedFeatures | None = None
        if config.handcrafted_features:
            self.handcrafted = HandcraftedFeatures()
        self.image_projection = ProjectionHead(
            in_dim=width + (N_FEATURES if config.handcrafted_features else 0),
            out_dim=config.proj_dim,
            dropout=config.proj_dropout,
        )
        if config.freeze_encoder:
            self.image_encoder.requires_grad_(False)
        self.spot_projection: ProjectionHead | None = None
        self.reconstructor: CrossModalReconstructor | None = None
        self.regressor: nn.Sequential | None = None
        if config.method in ("cmrcnet", "bleep"):
            self.spot_projection = ProjectionHead(
                in_dim=config.n_genes, out_dim=config.proj_dim, dropout=config.proj_dropout
            )
        if config.method == "cmrcnet":
            self.reconstructor = CrossModalReconstructor(
                n_genes=config.n_genes,
                width=width,
                dim=config.proj_dim,
                n_expr_tokens=config.n_expr_tokens,
                expr_dropout=config.expr_dropout,
                mask_mode=config.mask_mode,
                mask_keep_prob=config.mask_keep_prob,
                mask_in_eval=config.mask_in_eval,
                cross_heads=config.cross_heads,
                fusion_heads=config.fusion_heads,
                n_fusion_blocks=config.n_fusion_blocks,
                share_fusion_weights=config.share_fusion_weights,
                mlp_ratio=4.0,
                fusion_dropout=config.fusion_dropout,
                fusion_qk_dropout=config.fusion_qk_dropout,
            )
        if config.method == "regression":
            self.regressor = nn.Sequential(
                nn.Linear(config.proj_dim, config.regression_hidden),
                nn.GELU(),
                nn.Dropout(config.proj_dropout),
                nn.Linear(config.regression_hidden, config.n_genes),
            )

    def train(self, mode: bool = True) -> CMRCNet:
        """As nn.Module.train, but a frozen encoder always stays in eval mode (fixed dropout and norm statistics)."""
        super().train(mode)
        if self.config.freeze_encoder:
            self.image_encoder.eval()
        return self

    # ------------------------------------------------------------------ stages
    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B, 3, H, W) -> encoder tokens (B, T, width); no gradient when frozen."""
        if self.config.freeze_encoder:
            with torch.no_grad():
                return self.image_encoder(images)
        return self.image_encoder(images)

    def image_features(self, images: torch.Tensor) -> torch.Tensor | None:
        """Standardised handcrafted features (B, N_FEATURES), or None when the model does not fuse them."""
        return None if self.handcrafted is None else self.handcrafted(images)

    def embed_tokens(self, tokens: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder tokens (B, T, width) [+ handcrafted features (B, F)] -> image embedding (B, proj_dim).

        Tokens are mean-pooled, so pooled tokens (B, 1, width) give the same embedding as the full set.
        """
        pooled = tokens.mean(dim=1)  # (B, width)
        if self.handcrafted is not None:
            if features is None:
                raise ConfigError("this model fuses handcrafted features; pass them with the tokens")
            pooled = torch.cat([pooled, features.to(pooled.dtype)], dim=1)  # (B, width + F)
        return self.image_projection(pooled)  # (B, proj_dim)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images (B, 3, H, W) -> (encoder tokens (B, T, width), img_emb (B, proj_dim))."""
        tokens = self.encode_tokens(images)  # (B, T, width)
        return tokens, self.embed_tokens(tokens, self.image_features(images))

    def encode_expression(self, expr: torch.Tensor) -> torch.Tensor:
        """Expression (B, G) -> spot embedding (B, proj_dim). Not available for method "regression"."""
        if self.spot_projection is None:
            raise ConfigError(f"method {self.config.method!r} has no expression encoder")
        return self.spot_projection(self._check_expr(expr))

    def reconstruct(self, tokens: torch.Tensor, expr: torch.Tensor) -> torch.Tensor:
        """ViT tokens (B, T, width) + expression (B, G) -> reconstructed image embedding (B, proj_dim)."""
        if self.reconstructor is None:
            raise ConfigError(f"method {self.config.method!r} has no reconstruction branch")
        return self.reconstructor(tokens, self._check_expr(expr))

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image embedding (B, proj_dim) for retrieval (not L2-normalised)."""
        return self.encode_image(images)[1]

    def predict_expression(self, images: torch.Tensor) -> torch.Tensor:
        """Directly predicted expression (B, G); only for method "regression" (the others predict by retrieval)."""
        if self.regressor is None:
            raise ConfigError(
                f"method {self.config.method!r} predicts by retrieval, not directly; predict_expression needs "
                "method 'regression'"
            )
        return self.regressor(self.embed_images(images))

    # ------------------------------------------------------------------ losses
    def loss(
        self,
        images: torch.Tensor | None,
        expr: torch.Tensor,
        *,
        gather: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None,
        tokens: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training loss for a batch of images (B, 3, H, W) and their spots' expression (B, G).

        `gather` (distributed training only) collects embeddings from all processes for global negatives.
        `tokens` (and `features` when the model fuses handcrafted features) replace `images` when the encoder's
        outputs were computed beforehand (the frozen-encoder feature cache); `images` is then None.

        Returns float32 scalars: "loss" (the total to minimise) and its terms: "contrastive" and, for
        "cmrcnet", "reconstruction" (as they enter the total, i.e. after log1p when `log1p_losses`); for
        "regression" only "loss" and "regression" (the MSE).
        """
        cfg = self.config
        expr = self._check_expr(expr)
        if tokens is None:
            if images is None:
                raise ConfigError("loss needs images or precomputed tokens")
            tokens, img_emb = self.encode_image(images)
        else:
            img_emb = self.embed_tokens(tokens, features)
        if cfg.method == "regression":
            mse = mse_loss_fp32(self.regressor(img_emb), expr)
            return {"loss": mse, "regression": mse}
        spot_emb = self.encode_expression(expr)
        if gather is None:
            per_sample = contrastive_loss(img_emb, spot_emb, temperature=cfg.temperature)  # (B,)
        else:
            all_img, offset = gather(img_emb)  # (N, D) over all processes
            all_spot, _ = gather(spot_emb)  # (N, D)
            per_sample = contrastive_loss(
                img_emb,
                spot_emb,
                temperature=cfg.temperature,
                all_img_emb=all_img,
                all_spot_emb=all_spot,
                offset=offset,
            )  # (B,) rows of this process
        contrastive = torch.log1p(per_sample).mean() if cfg.log1p_losses else per_sample.mean()
        losses = {"loss": contrastive, "contrastive": contrastive}
        if cfg.method == "cmrcnet":
            recon = self.reconstruct(tokens, expr)  # (B, proj_dim)
            target = img_emb.detach() if cfg.detach_recon_target else img_emb
            score = relative_reconstruction_loss if cfg.recon_loss == "relative" else mse_loss_fp32
            error = score(recon, target)
            reconstruction = torch.log1p(error) if cfg.log1p_losses else error
            losses["reconstruction"] = reconstruction
            losses["loss"] = contrastive + cfg.recon_weight * reconstruction
        return losses

    def forward(
        self,
        images: torch.Tensor | None,
        expr: torch.Tensor,
        *,
        gather: Callable[[torch.Tensor], tuple[torch.Tensor, int]] | None = None,
        tokens: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Same as `loss` (so DistributedDataParallel wraps the whole training computation)."""
        return self.loss(images, expr, gather=gather, tokens=tokens, features=features)

    def _check_expr(self, expr: torch.Tensor) -> torch.Tensor:
        if expr.ndim != 2 or expr.shape[1] != self.config.n_genes:
            raise ConfigError(
                f"expression must be (B, {self.config.n_genes}) (the model's n_genes), got {tuple(expr.shape)}"
            )
        return expr


def build_model(config: ModelConfig) -> CMRCNet:
    """The model for `config` (any method), freshly initialised."""
    model = CMRCNet(config)
    n_params = sum(p.numel() for p in model.parameters())
    logger.debug("built %s model (encoder %s): %d parameters", config.method, config.encoder, n_params)
    return model
