"""Cheap colour and texture statistics of a patch, used two ways:

* as the "kNN on handcrafted features" floor in the accuracy benchmark, and
* fused into the model (`ModelConfig.handcrafted_features`): appended to the pooled encoder tokens before the image
  projection head, so what a colour histogram knows is available to the learned embedding from the first step.

Every feature is a global statistic of the patch built from per-pixel values that do not depend on orientation
(gradient magnitudes use |dx| + |dy|), so the features are unchanged by the flips and 90-degree rotations used
for augmentation; they can be computed once per spot.

Features (27), from the patch in [0, 1] RGB:
    rgb mean (3), rgb std (3), optical density mean (3; -log10 of transmitted light, the Beer-Lambert stain
    amount), saturation mean and std (2), fraction of grey levels below 0.35 / 0.55 / 0.75 (3; nuclei, stroma,
    background), fraction of pixels bluer than red (1; haematoxylin over eosin), gradient magnitude at scales
    1, 2 and 4 px (3), grey std after 4x4 averaging (1; coarse contrast), grey-level histogram in 8 bins (8).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from cmrcnet.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, images_to_float

logger = logging.getLogger(__name__)

FEATURE_NAMES: tuple[str, ...] = (
    *(f"rgb_mean_{c}" for c in "rgb"),
    *(f"rgb_std_{c}" for c in "rgb"),
    *(f"od_mean_{c}" for c in "rgb"),
    "saturation_mean",
    "saturation_std",
    "grey_below_0.35",
    "grey_below_0.55",
    "grey_below_0.75",
    "bluer_than_red",
    "gradient_1px",
    "gradient_2px",
    "gradient_4px",
    "grey_std_4px",
    *(f"grey_hist_{i}" for i in range(8)),
)
N_FEATURES = len(FEATURE_NAMES)


def _to_unit_rgb(images: torch.Tensor) -> torch.Tensor:
    """Normalised model input (B, 3, H, W) -> float32 RGB in [0, 1]."""
    m = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() * s + m).clamp_(0.0, 1.0)


def _gradient_magnitude(grey: torch.Tensor) -> torch.Tensor:
    """Mean |dx| + |dy| of (B, 1, H, W) -> (B,)."""
    dx = (grey[..., :, 1:] - grey[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    dy = (grey[..., 1:, :] - grey[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    return dx + dy


@torch.no_grad()
def handcrafted_features(images: torch.Tensor) -> torch.Tensor:
    """Raw (unstandardised) features of normalised model input (B, 3, H, W) -> float32 (B, N_FEATURES)."""
    x = _to_unit_rgb(images)  # (B, 3, H, W)
    b = x.shape[0]
    flat = x.flatten(2)  # (B, 3, HW)
    rgb_mean = flat.mean(dim=2)  # (B, 3)
    rgb_std = flat.std(dim=2, correction=0)  # (B, 3)
    od = -torch.log10((flat * 255.0 + 1.0) / 256.0)  # (B, 3, HW)
    hi = flat.amax(dim=1)  # (B, HW)
    lo = flat.amin(dim=1)
    sat = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-6), torch.zeros_like(hi))  # (B, HW)
    grey = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
    g = grey.flatten(1)  # (B, HW)
    fractions = [(g < t).float().mean(dim=1) for t in (0.35, 0.55, 0.75)]
    bluer = (flat[:, 2] > flat[:, 0]).float().mean(dim=1)  # (B,)
    grads = [_gradient_magnitude(grey)]
    for factor in (2, 4):
        grads.append(_gradient_magnitude(F.avg_pool2d(grey, factor)))
    coarse_std = F.avg_pool2d(grey, 4).flatten(1).std(dim=1, correction=0)  # (B,)
    bins = (g * 8).long().clamp_(0, 7)  # (B, HW)
    hist = torch.zeros(b, 8, dtype=torch.float32, device=x.device).scatter_add_(1, bins, torch.ones_like(g))
    hist = hist / g.shape[1]
    columns = [
        rgb_mean,
        rgb_std,
        od.mean(dim=2),
        sat.mean(dim=1, keepdim=True),
        sat.std(dim=1, correction=0, keepdim=True),
        *(f.unsqueeze(1) for f in fractions),
        bluer.unsqueeze(1),
        *(gr.unsqueeze(1) for gr in grads),
        coarse_std.unsqueeze(1),
        hist,
    ]
    return torch.cat(columns, dim=1)  # (B, N_FEATURES)


@torch.no_grad()
def patch_features(patches: torch.Tensor, *, chunk: int = 256) -> torch.Tensor:
    """Raw features of uint8 patches (N, S, S, 3) -> float32 (N, N_FEATURES), computed `chunk` patches at a time."""
    return torch.cat(
        [
            handcrafted_features(images_to_float(patches[i : i + chunk], layout="nhwc"))
            for i in range(0, len(patches), chunk)
        ]
    )


class HandcraftedFeatures(nn.Module):
    """`handcrafted_features` standardised with statistics of the training spots (buffers, saved with the model).

    `fit` must be called once with raw features of the training spots before training; until then the module
    is the identity standardisation and `fitted` is 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(N_FEATURES))
        self.register_buffer("std", torch.ones(N_FEATURES))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.uint8))

    @torch.no_grad()
    def fit(self, raw: torch.Tensor) -> None:
        """Set the standardisation from raw features (N, N_FEATURES) of the training spots."""
        raw = raw.float()
        self.mean.copy_(raw.mean(dim=0))
        # a feature constant over the training spots (std 0) is centred but not scaled
        std = raw.std(dim=0, correction=0) if len(raw) > 1 else torch.ones(N_FEATURES)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        self.fitted.fill_(1)

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw.float() - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised model input (B, 3, H, W) -> standardised features (B, N_FEATURES), float32."""
        return self.standardise(handcrafted_features(images))
