"""Training augmentation of uint8 patch batches: random dihedral transforms and colour jitter, then the
encoder's normalisation (`cmrcnet.models.preprocess`). Spot tables are in `cmrcnet.data.spots`."""

from __future__ import annotations

import torch

from cmrcnet.data.spots import SpotTable, load_spot_table, resize_uint8
from cmrcnet.models.preprocess import images_to_float, normalise_unit_images

__all__ = ["SpotTable", "augment", "load_spot_table", "resize_uint8"]


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    flips: bool = True,
    rot90: bool = True,
    color_jitter: float = 0.0,
) -> torch.Tensor:
    """Random dihedral transforms (+ optional colour jitter) of uint8 (B, S, S, 3); returns model input.

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
    if color_jitter <= 0:
        return images_to_float(x, layout="nhwc")  # (B, 3, S, S), channels-last memory
    x01 = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S)
    scale = 1 + color_jitter * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)  # (B, 3, 1, 1)
    shift = 0.5 * color_jitter * (2 * torch.rand(b, 3, 1, 1, generator=generator) - 1)  # (B, 3, 1, 1)
    x01 = (x01 * scale.to(x01.device) + shift.to(x01.device)).clamp_(0, 1)
    return normalise_unit_images(x01)
