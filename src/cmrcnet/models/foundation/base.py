"""What every foundation-model backbone shares: the change from cmrcnet's input normalisation to the vendor's."""

from __future__ import annotations

import torch
from torch import nn

from cmrcnet.errors import ConfigError
from cmrcnet.models.preprocess import IMAGENET_MEAN, IMAGENET_STD


class FoundationBackbone(nn.Module):
    """Base of the vendor architectures.

    cmrcnet normalises every image with the ImageNet mean and standard deviation (`images_to_float`) before any
    encoder sees it. A vendor trained with other constants (H-optimus: its own; CONCH: OpenAI CLIP's) gets them
    here: x_vendor = (x * s_in + m_in - m) / s, one per-channel affine map held in non-persistent buffers, so the
    state dict keeps exactly the vendor's tensors. For vendors with the ImageNet constants it is the identity and
    is skipped.

    `optional_tensors` names state-dict prefixes a vendor file may lack without changing the embedding (e.g. a
    pooler the embedding does not use); any other missing tensor is an error when weights are loaded.
    """

    optional_tensors: tuple[str, ...] = ()
    out_dim: int

    def __init__(self, *, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.mean, self.std = tuple(mean), tuple(std)
        self.identity_norm = self.mean == tuple(IMAGENET_MEAN) and self.std == tuple(IMAGENET_STD)
        m_in, s_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        m, s = torch.tensor(self.mean), torch.tensor(self.std)
        self.register_buffer("in_scale", (s_in / s).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((m_in - m) / s).view(1, 3, 1, 1), persistent=False)

    def renormalise(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images (B, 3, H, W) -> the vendor's normalisation."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"images must be (B, 3, H, W) float tensors, got shape {tuple(images.shape)}")
        if self.identity_norm:
            return images
        return torch.addcmul(self.in_shift.to(images.dtype), images, self.in_scale.to(images.dtype))
