"""The pathology foundation models cmrcnet can use as image encoders: one table, one entry per model.

Every entry records the vendor's architecture (as keyword arguments of a module in this package whose parameter
names are the vendor's), the input the vendor documents (pixels, micrometres per pixel, normalisation constants),
the embedding width, where users get the weights and the licence they accept there. Nothing is downloaded: users
point `cmrcnet train --encoder-weights` at the file (or folder) they have.

HEST-Benchmark's convention, used where a vendor documents nothing else: 224 px at 0.5 um/px (112 um patches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from cmrcnet.models.foundation.conch import ConchVisual
from cmrcnet.models.foundation.hf_vit import HFViT
from cmrcnet.models.foundation.timm_vit import TimmViT

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))  # H-optimus config.json
OPENAI_CLIP = (
    (0.48145466, 0.4578275, 0.40821073),
    (0.26862954, 0.26130258, 0.27577711),
)  # CONCH constants.py


@dataclass(frozen=True)
class FoundationSpec:
    """A pathology foundation model: its architecture, its input convention and where its weights come from."""

    name: str  # registry name, the value of `--encoder`
    title: str  # the vendor's name
    architecture: str  # short description, e.g. "ViT-L/16, LayerScale"
    module: Callable[..., nn.Module]  # the class whose parameter names are the vendor's
    kwargs: dict[str, Any]  # the vendor's hyperparameters
    embed_dim: int  # width of the embedding `forward` returns (as one token)
    img_size: int  # input side in pixels the vendor trained / documents
    um_per_px: float  # micrometres per pixel of that input
    input_note: str  # the µm/px convention in words (vendor or HEST)
    mean: tuple[float, float, float]  # normalisation mean (0-1 scale, RGB)
    std: tuple[float, float, float]  # normalisation standard deviation
    weights_repo: str  # where users get the weights (Hugging Face repository)
    weights_file: str  # the file users download there
    licence: str  # the terms users accept there
    tiny: dict[str, Any] = field(
        default_factory=dict
    )  # overrides giving a small model of the same layout (tests)

    def build(self, **overrides: Any) -> nn.Module:
        """The module with the vendor's hyperparameters (or `overrides` of them), randomly initialised."""
        return self.module(**{**self.kwargs, "mean": self.mean, "std": self.std, **overrides})

    @property
    def weights_url(self) -> str:
        return f"https://huggingface.co/{self.weights_repo}"

    @property
    def fov_um(self) -> float:
        return self.img_size * self.um_per_px


def _vit(**kwargs: Any) -> dict[str, Any]:
    return kwargs


_VIT_L16 = _vit(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5)
# DINOv2 ViT-g/14 with registers, timm `vit_giant_patch14_reg4_dinov2`: packed SwiGLU of hidden 2 x 4096
_VIT_G14_REG4 = _vit(
    img_size=224, patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=2.66667 * 2,
    swiglu=True, reg_tokens=4, no_embed_class=True,
)  # fmt: skip
_TINY_TIMM = dict(embed_dim=48, depth=2, num_heads=4)
_HEST = "HEST: 224 px at 0.5 um/px (112 um)"
_CC_NC_ND = "CC-BY-NC-ND 4.0 (non-commercial, no derivatives; gated: accept the terms on Hugging Face)"

FOUNDATION_SPECS: dict[str, FoundationSpec] = {
    s.name: s
    for s in (
        FoundationSpec(
            "uni", "UNI (Mahmood lab)", "ViT-L/16, LayerScale", TimmViT, _VIT_L16, 1024, 224, 0.5,
            "vendor: 224 px at 20x (0.5 um/px)", *IMAGENET, "MahmoodLab/UNI", "pytorch_model.bin", _CC_NC_ND,
            dict(_TINY_TIMM, img_size=64),
        ),
        FoundationSpec(
            "uni2-h", "UNI2-h (Mahmood lab)", "ViT-H/14 (1536 wide, 24 blocks), 8 registers, packed SwiGLU, LayerScale",
            TimmViT,
            _vit(img_size=224, patch_size=14, embed_dim=1536, depth=24, num_heads=24, init_values=1e-5,
                 mlp_ratio=2.66667 * 2, swiglu=True, reg_tokens=8, no_embed_class=True),
            1536, 224, 0.5, "vendor: 224 px at 20x (0.5 um/px)", *IMAGENET, "MahmoodLab/UNI2-h", "pytorch_model.bin",
            _CC_NC_ND, dict(_TINY_TIMM, img_size=56),
        ),
        FoundationSpec(
            "h-optimus-0", "H-optimus-0 (Bioptimus)", "ViT-g/14, 4 registers, packed SwiGLU, LayerScale", TimmViT,
            _VIT_G14_REG4, 1536, 224, 0.5, "vendor: 224 px at 0.5 um/px", *BIOPTIMUS, "bioptimus/H-optimus-0",
            "pytorch_model.bin", "Apache 2.0 (gated: share contact details on Hugging Face)",
            dict(_TINY_TIMM, img_size=56),
        ),
        FoundationSpec(
            "h-optimus-1", "H-optimus-1 (Bioptimus)", "ViT-g/14, 4 registers, packed SwiGLU, LayerScale", TimmViT,
            _VIT_G14_REG4, 1536, 224, 0.5, "vendor: 224 px at 0.5 um/px", *BIOPTIMUS, "bioptimus/H-optimus-1",
            "pytorch_model.bin", "gated on Hugging Face; the terms on the model card (access reviewed by Bioptimus)",
            dict(_TINY_TIMM, img_size=56),
        ),
        FoundationSpec(
            "virchow2", "Virchow2 (Paige)", "ViT-H/14, 4 registers, packed SwiGLU, LayerScale; class + mean patch token",
            TimmViT,
            _vit(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, init_values=1e-5,
                 mlp_ratio=5.3375, swiglu=True, reg_tokens=4, pool="token+mean"),
            2560, 224, 0.5, "vendor: 224 px, trained at 5x-40x; " + _HEST, *IMAGENET, "paige-ai/Virchow2",
            "pytorch_model.bin", _CC_NC_ND, dict(_TINY_TIMM, img_size=56),
        ),
        FoundationSpec(
            "prov-gigapath", "Prov-GigaPath tile encoder (Providence / Microsoft)",
            "ViT-g (1536 wide, 40 blocks) with 16 px patches, packed SwiGLU, LayerScale", TimmViT,
            _vit(img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                 mlp_ratio=5.33334, swiglu=True),
            1536, 224, 0.5, "vendor: 256 px tiles at 0.5 um/px, centre crop 224", *IMAGENET,
            "prov-gigapath/prov-gigapath", "pytorch_model.bin",
            "Apache 2.0 model card, research use only (gated: accept the terms on Hugging Face)",
            dict(_TINY_TIMM, img_size=64),
        ),
        FoundationSpec(
            "phikon", "Phikon (Owkin)", "ViT-B/16, Hugging Face transformers layout", HFViT,
            dict(img_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, layer_norm_eps=1e-6),
            768, 224, 0.5, "vendor: 224 px at 20x (0.5 um/px)", *IMAGENET, "owkin/phikon",
            "pytorch_model.bin or model.safetensors", "Owkin non-commercial licence (see the model card)",
            dict(img_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96),
        ),
        FoundationSpec(
            "conch-v1", "CONCH v1 image tower (Mahmood lab)",
            "ViT-B/16 trunk + attentional pooler (CoCa / open_clip layout)", ConchVisual, {}, 512, 448, 0.5,
            "vendor: 448 px (resize + centre crop); " + _HEST + ", position embedding interpolated", *OPENAI_CLIP,
            "MahmoodLab/CONCH", "pytorch_model.bin", _CC_NC_ND,
            dict(img_size=64, width=48, depth=2, heads=4, embed_dim_contrast=32, embed_dim_caption=48,
                 pooler_heads=4, n_queries_caption=8),
        ),
    )
}  # fmt: skip
