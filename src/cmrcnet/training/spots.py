"""Training augmentation of uint8 patch batches: random dihedral transforms, colour, stain and resolution
jitter, then the encoder's normalisation (`cmrcnet.models.preprocess`). Spot tables are in `cmrcnet.data.spots`.

Stain and resolution jitter are there for slides from other scanners and labs:
- stain jitter scales and shifts each RGB channel's optical density (Beer-Lambert: absorbance is additive in
  stain amount), so a patch looks as if stained more or less strongly with another balance of haematoxylin and
  eosin, and scanned with another colour response. No stain matrix is assumed. This is the randomisation of
  Tellez et al. (Medical Image Analysis 58, 101544, 2019) done per RGB channel instead of per H&E channel;
- resolution jitter shrinks a patch by a random factor (log-uniform in [1, max], in 8 levels) and enlarges it back, as a
  slide scanned at a coarser pixel size is read over the same field of view and resized to the model's input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cmrcnet.data.spots import SpotTable, load_spot_table, resize_uint8
from cmrcnet.models.preprocess import images_to_float, normalise_unit_images

__all__ = ["SpotTable", "augment", "load_spot_table", "resize_uint8"]

RESOLUTION_LEVELS = 8  # resolution jitter draws its factor from this many log-spaced levels


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    flips: bool = True,
    rot90: bool = True,
    color_jitter: float = 0.0,
    stain_jitter: float = 0.0,
    scale_jitter: float = 1.0,
) -> torch.Tensor:
    """Random dihedral transforms (+ optional colour, stain and resolution jitter) of uint8 (B, S, S, 3);
    returns model input.

    All randomness comes from `generator` (on the CPU), so a seeded run is reproducible and resumable.
    """
    b = images.shape[0]
    x = images
    if flips:
        hflip = torch.rand(b, generator=generator) < 0.5
        vflip = torch.rand(b, generator=generator) < 0.5
        x = torch.where(hflip.view(b, 1, 1, 1).to(x.device), x.flip(2), x)
        x = torch.where(vflip.view(b, 1, 1, 1).to(x.device), x.flip(1), x)
    if rot90:
        k = torch.randint(0, 4, (b,), generator=generator)
        rotated = x.clone()
        for turns in (1, 2, 3):
            sel = (k == turns).nonzero().view(-1).to(x.device)
            if len(sel):
                rotated[sel] = torch.rot90(x[sel], turns, dims=(1, 2))
        x = rotated
    if color_jitter <= 0 and stain_jitter <= 0 and scale_jitter <= 1:
        return images_to_float(x, layout="nhwc")  # (B, 3, S, S), channels-last memory
    x01 = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S)
    if scale_jitter > 1:
        x01 = _resolution_jitter(x01, scale_jitter, generator)
    if stain_jitter > 0:
        x01 = _stain_jitter(x01, stain_jitter, generator)
    if color_jitter > 0:
        scale = 1 + color_jitter * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)  # (B, 3, 1, 1)
        shift = 0.5 * color_jitter * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)  # (B, 3, 1, 1)
        x01 = (x01 * scale.to(x01.device) + shift.to(x01.device)).clamp_(0, 1)
    return normalise_unit_images(x01)


def _stain_jitter(x01: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image, per-channel optical density od * a + c, a in [1 - s, 1 + s], c in [-s/4, s/4] (OD units)."""
    b = x01.shape[0]
    a = 1 + strength * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)  # (B, 3, 1, 1)
    c = 0.25 * strength * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)  # (B, 3, 1, 1)
    od = -torch.log(x01.clamp(min=1.0 / 255.0))  # (B, 3, S, S), 0 for white glass
    od = (od * a.to(x01.device) + c.to(x01.device)).clamp_(min=0.0)
    return torch.exp(-od)


def _resolution_jitter(x01: torch.Tensor, max_factor: float, generator: torch.Generator) -> torch.Tensor:
    """Each patch shrunk by a factor log-uniform in [1, max_factor] (antialiased) and resized back (bilinear).

    The factor is drawn from 8 log-spaced levels, so patches of one level are resized together."""
    b, _, s, _ = x01.shape
    levels = torch.exp(torch.linspace(0.0, math.log(max_factor), RESOLUTION_LEVELS))  # (L,)
    level = torch.randint(0, RESOLUTION_LEVELS, (b,), generator=generator)  # (B,)
    out = x01.clone()
    for i, f in enumerate(levels.tolist()):
        small = max(4, round(s / f))
        sel = (level == i).nonzero().view(-1).to(x01.device)
        if small >= s or not len(sel):
            continue
        down = F.interpolate(x01[sel], size=(small, small), mode="bilinear", antialias=True, align_corners=False)
        out[sel] = F.interpolate(down, size=(s, s), mode="bilinear", align_corners=False).clamp_(0, 1)
    return out
