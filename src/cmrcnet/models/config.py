"""The model's configuration: one typed dataclass, stored inside every checkpoint as a plain dict.

Encoder presets live in ONE table, `ENCODER_PRESETS`. A config names the preset its encoder fields came from
(`encoder`), or "custom" when they were set by hand; `ModelConfig.from_preset` is the usual way to build one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

from cmrcnet.errors import ConfigError

logger = logging.getLogger(__name__)

# The training objectives. All share the same image encoder and image projection head.
METHODS = (
    "cmrcnet",  # contrastive (BLEEP soft-target CLIP loss) + cross-modal masked reconstruction
    "bleep",  # contrastive only (the paper's ablation / the BLEEP baseline with a ViT)
    "regression",  # image embedding -> MLP -> G genes, MSE against the measured expression (ST-Net style)
)

# How the reconstruction is scored against the image embedding (method "cmrcnet").
RECON_LOSSES = (
    "mse",  # mean squared error (the paper)
    "relative",  # squared error of the batch-centred vectors over the centred target's squared norm
)

# How the image tokens are masked before the cross-modal reconstruction.
MASK_MODES = (
    "element",  # every feature of every token kept independently (the reference code)
    "token",  # whole tokens kept or zeroed
)

ENCODER_FIELDS = ("img_size", "patch_size", "width", "depth", "heads")

# Named image-encoder sizes. "paper": the reference ViT-B/32 with depth 8 (METHOD.md step 1). "cpu": chosen by
# measurement on a 2-core CPU (benchmarks/results/cpu_preset_selection.md). "tiny": for unit tests only.
ENCODER_PRESETS: dict[str, dict[str, int]] = {
    "paper": dict(img_size=224, patch_size=32, width=768, depth=8, heads=8),
    "cpu": dict(img_size=224, patch_size=32, width=256, depth=4, heads=4),
    "tiny": dict(img_size=32, patch_size=8, width=32, depth=1, heads=2),
}


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model exactly (see METHOD.md for the meaning of each stage)."""

    n_genes: int  # G: number of genes in the expression vectors
    method: str = "cmrcnet"  # training objective, one of METHODS
    # --- image encoder ---
    image_encoder: str = "vit-cmrcnet"  # architecture, one of models.encoders.ARCHITECTURES
    freeze_encoder: bool = False  # keep the encoder's weights fixed (eval mode); only heads train
    handcrafted_features: bool = False  # append colour/texture statistics to the pooled tokens (handcrafted.py)
    # --- ViT sizes (used by image_encoder "vit-cmrcnet") ---
    encoder: str = "paper"  # name of the ENCODER_PRESETS entry the fields below match, or "custom"
    img_size: int = 224  # side of the square input patch in pixels
    patch_size: int = 32  # side of a ViT patch in pixels (img_size must be a multiple)
    width: int = 768  # ViT token dimension
    depth: int = 8  # number of ViT blocks
    heads: int = 8  # ViT attention heads (width must be a multiple)
    mlp_ratio: float = 4.0  # ViT MLP hidden size / width
    dropout: float = 0.0  # ViT dropout after position embedding, attention projection and MLP
    # --- projection heads (image and spot embeddings) ---
    proj_dim: int = 256  # embedding dimension shared by images and spots (and the reconstruction stream)
    proj_dropout: float = 0.1  # dropout inside the projection heads
    # --- cross-modal masked reconstruction (method "cmrcnet") ---
    n_expr_tokens: int = 8  # expression tokens: Linear(G, n_expr_tokens * proj_dim) reshaped
    expr_dropout: float = 0.25  # AlphaDropout after the expression tokens' ELU
    mask_mode: str = "element"  # how image tokens are masked, one of MASK_MODES
    mask_keep_prob: float = (
        0.5  # probability that an element (or token) is kept; kept values are not rescaled
    )
    mask_in_eval: bool = True  # also mask in eval mode (the reference does: its validation loss is masked)
    cross_heads: int = 4  # heads of the first cross-attention (image queries, expression keys/values)
    fusion_heads: int = 8  # heads of the fusion blocks' self- and cross-attention
    n_fusion_blocks: int = 2  # fusion blocks applied one after the other
    share_fusion_weights: bool = True  # one fusion block module reused n_fusion_blocks times (the reference)
    fusion_dropout: float = 0.1  # dropout on the fusion blocks' attention projection and MLP
    fusion_qk_dropout: float = 0.25  # dropout inside the fusion cross-attention's query/key projections
    detach_recon_target: bool = False  # stop gradients through the reconstruction target (image embedding)
    # --- losses ---
    temperature: float = 1.0  # T of the contrastive loss
    log1p_losses: bool = True  # total = mean(log1p(contrastive)) + log1p(recon); False: plain means
    recon_weight: float = 1.0  # factor on the reconstruction term of the total (1: the paper)
    recon_loss: str = "mse"  # how the reconstruction is scored, one of RECON_LOSSES ("mse": the paper)
    # --- regression baseline (method "regression") ---
    regression_hidden: int = 256  # hidden units of the MLP from the image embedding to G genes

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(
        cls, name: str, *, n_genes: int, method: str = "cmrcnet", **overrides: Any
    ) -> ModelConfig:
        """A config whose encoder fields come from `ENCODER_PRESETS[name]`.

        Keyword overrides may change any field; overriding an encoder field to a value other than the
        preset's makes the config "custom".
        """
        if name not in ENCODER_PRESETS:
            raise ConfigError(f"unknown encoder preset {name!r}; choose one of {sorted(ENCODER_PRESETS)}")
        _reject_unknown(overrides, "override")
        fields = dict(ENCODER_PRESETS[name])
        encoder = name
        for key in ENCODER_FIELDS:
            if key in overrides and overrides[key] != fields[key]:
                encoder = "custom"
        fields.update(overrides)
        fields.setdefault("encoder", encoder)
        return cls(n_genes=n_genes, method=method, **fields)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict (str, int, float, bool values only)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`. Missing keys take their defaults; unknown keys are an error."""
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a dict, got {type(data).__name__}")
        _reject_unknown(data, "model config key")
        if "n_genes" not in data:
            raise ConfigError("model config lacks 'n_genes'")
        return cls(**data)

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_patches(self) -> int:
        """Number of ViT patches per image."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def n_tokens(self) -> int:
        """ViT output tokens per image: class token + patches."""
        return 1 + self.n_patches

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        _check_int(self, "n_genes", 1)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if self.recon_loss not in RECON_LOSSES:
            raise ConfigError(f"unknown recon_loss {self.recon_loss!r}; choose one of {list(RECON_LOSSES)}")
        if self.mask_mode not in MASK_MODES:
            raise ConfigError(f"unknown mask_mode {self.mask_mode!r}; choose one of {list(MASK_MODES)}")
        for name in (*ENCODER_FIELDS, "proj_dim", "n_expr_tokens", "cross_heads", "fusion_heads"):
            _check_int(self, name, 1)
        _check_int(self, "n_fusion_blocks", 0)
        _check_int(self, "regression_hidden", 1)
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        for name in ("cross_heads", "fusion_heads"):
            if self.proj_dim % getattr(self, name):
                raise ConfigError(
                    f"proj_dim {self.proj_dim} is not divisible by {name} {getattr(self, name)}"
                )
        for name in ("dropout", "proj_dropout", "expr_dropout", "fusion_dropout", "fusion_qk_dropout"):
            value = _check_number(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        keep = _check_number(self, "mask_keep_prob")
        if not 0.0 < keep <= 1.0:
            raise ConfigError(f"mask_keep_prob must be in (0, 1], got {keep}")
        for name in ("temperature", "mlp_ratio", "recon_weight"):
            value = _check_number(self, name)
            if not value > 0.0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if int(self.width * self.mlp_ratio) < 1:
            raise ConfigError(f"mlp_ratio {self.mlp_ratio} gives an empty ViT MLP for width {self.width}")
        from cmrcnet.models.encoders import ARCHITECTURES

        if self.image_encoder not in ARCHITECTURES:
            raise ConfigError(
                f"unknown image_encoder {self.image_encoder!r}; choose one of {sorted(ARCHITECTURES)}"
            )
        for name in (
            "mask_in_eval",
            "share_fusion_weights",
            "detach_recon_target",
            "log1p_losses",
            "freeze_encoder",
            "handcrafted_features",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.encoder, str):
            raise ConfigError(f"encoder must be a preset name or 'custom', got {self.encoder!r}")
        if self.encoder != "custom":
            if self.encoder not in ENCODER_PRESETS:
                raise ConfigError(
                    f"unknown encoder preset {self.encoder!r}; choose one of {sorted(ENCODER_PRESETS)} or 'custom'"
                )
            preset = ENCODER_PRESETS[self.encoder]
            differ = [
                f"{k}={getattr(self, k)} (preset {preset[k]})"
                for k in ENCODER_FIELDS
                if getattr(self, k) != preset[k]
            ]
            if differ:
                raise ConfigError(
                    f"encoder={self.encoder!r} but {', '.join(differ)}; use ModelConfig.from_preset"
                    f"({self.encoder!r}, ...) or encoder='custom'"
                )


def _reject_unknown(data: dict[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {what}(s) {unknown}")


def _check_int(cfg: ModelConfig, name: str, minimum: int) -> int:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_number(cfg: ModelConfig, name: str) -> float:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)
