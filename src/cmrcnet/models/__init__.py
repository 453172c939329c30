"""Models: pure tensor code (no files). See METHOD.md for the method and `cmrcnet.models.model` for the stages."""

from cmrcnet.models.config import ENCODER_PRESETS, MASK_MODES, METHODS, ModelConfig
from cmrcnet.models.flops import model_flops_per_spot
from cmrcnet.models.layers import ProjectionHead
from cmrcnet.models.losses import contrastive_loss
from cmrcnet.models.model import CMRCNet, build_model
from cmrcnet.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, images_to_float
from cmrcnet.models.reconstruction import CrossModalReconstructor, random_mask
from cmrcnet.models.vit import VisionTransformer

__all__ = [
    "ENCODER_PRESETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MASK_MODES",
    "METHODS",
    "CMRCNet",
    "CrossModalReconstructor",
    "ModelConfig",
    "ProjectionHead",
    "VisionTransformer",
    "build_model",
    "contrastive_loss",
    "images_to_float",
    "model_flops_per_spot",
    "random_mask",
]
