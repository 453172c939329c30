"""Validation loss on the held-out training spots: fixed batches and a fixed masking seed, so epochs compare."""

from __future__ import annotations

import torch
from torch import nn

from cmrcnet.data.spots import SpotTable
from cmrcnet.runtime import autocast_context
from cmrcnet.training.feature_cache import FrozenFeatures
from cmrcnet.training.schedule import index_batches
from cmrcnet.training.spots import augment


def frozen_inputs(
    model: nn.Module, feats: FrozenFeatures, idx: torch.Tensor, variant: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cached encoder tokens of some spots, and their handcrafted features standardised by `model`.

    Parameters
    ----------
    model
        The model whose handcrafted standardisation applies (None features when it has no handcrafted branch).
    feats
        The frozen encoder outputs of a spot table.
    idx
        Rows of `feats` to take.
    variant
        The dihedral variant of each row (0 = as read).
    device
        Where the returned tensors live.

    Returns
    -------
    tuple
        (tokens (B, T, C) float32, standardised features (B, F) or None).
    """
    tokens = feats.tokens[idx, variant].to(device, torch.float32)  # (B, T, C)
    features = None
    if model.handcrafted is not None:
        features = model.handcrafted.standardise(feats.features[idx].to(device))
    return tokens, features


def batch_loss(
    model: nn.Module,
    spots: SpotTable,
    idx: torch.Tensor,
    *,
    frozen: FrozenFeatures | None,
    device: torch.device,
    precision: str,
) -> float:
    """The model's loss on rows `idx` of `spots` (images as read, or their frozen features when given)."""
    expr = spots.expr[idx].to(device)
    if frozen is not None:
        identity = torch.zeros(len(idx), dtype=torch.long)
        tokens, features = frozen_inputs(model, frozen, idx, identity, device)
        with autocast_context(device, precision):
            return float(model(None, expr, tokens=tokens, features=features)["loss"])
    images = augment(spots.images[idx], torch.Generator(), flips=False, rot90=False)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    with autocast_context(device, precision):
        return float(model(images, expr)["loss"])


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    spots: SpotTable,
    *,
    frozen: FrozenFeatures | None,
    batch_size: int,
    seed: int,
    device: torch.device,
    precision: str,
) -> float:
    """Mean loss over every validation spot, in fixed batches with a fixed masking seed.

    Parameters
    ----------
    model
        The model to score; it is put in eval mode and back in train mode.
    spots
        The validation spots.
    frozen
        Their frozen encoder outputs, or None to encode the images.
    batch_size, seed
        The run's batch size and seed (the masking stream is seeded with it, then restored).
    device, precision
        Where and in which precision to compute.

    Returns
    -------
    float
        The mean loss per spot (NaN without validation spots).
    """
    if len(spots) == 0:
        return float("nan")
    model.eval()
    total, n = 0.0, 0

    def add(idx: torch.Tensor) -> None:
        nonlocal total, n
        total += batch_loss(model, spots, idx, frozen=frozen, device=device, precision=precision) * len(idx)
        n += len(idx)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for idx in index_batches(len(spots), batch_size, torch.Generator(), shuffle=False):
            add(idx)
        if len(spots) - n >= 2:  # the tail batch too: every validation spot counts
            add(torch.arange(n, len(spots)))
    model.train()
    return total / max(1, n)
