"""The training schedule's pieces: learning rate, index batches, seeds, and the EMA of the weights."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def lr_at(step: int, *, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `total` steps."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def index_batches(
    n: int, batch: int, generator: torch.Generator, *, shuffle: bool, multiple: int = 1
) -> list[torch.Tensor]:
    """Index batches of equal size `batch` (the incomplete tail is dropped), or one batch of all n when n < batch,
    cut to a multiple of `multiple` so every process gets an equal share (the embedding gather needs it)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if n <= batch:
        return [order[: n - n % multiple]]
    return [order[i : i + batch] for i in range(0, n - batch + 1, batch)]


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].lerp_(v.detach().float(), 1.0 - self.decay)
            else:
                self.state[k].copy_(v)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)
