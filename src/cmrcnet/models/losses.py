"""Losses, computed in float32 even under autocast."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

REDUCTIONS = ("none", "mean", "sum")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of `logits` against the probability row of `targets`: (R, C) -> (R,)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def contrastive_loss(
    img_emb: torch.Tensor,
    spot_emb: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    *,
    all_img_emb: torch.Tensor | None = None,
    all_spot_emb: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """BLEEP's soft-target CLIP loss (METHOD.md step 4), one value per sample of the local batch.

    With N samples, `logits = spot @ img.T / T` (N, N) and `targets = softmax((img @ img.T + spot @ spot.T) / 2
    * T)` row-wise (the reference multiplies by T here; with the default T = 1 it makes no difference).
    Sample i's loss is the mean of CE(logits[i], targets[i]) (spot -> image) and CE(logits.T[i], targets.T[i])
    (image -> spot).

    Distributed training: pass this process's embeddings as `img_emb`/`spot_emb` (b rows) and the embeddings
    gathered from all processes as `all_img_emb`/`all_spot_emb` (N rows, this process's rows at
    `offset:offset + b`). The result is then rows `offset:offset + b` of the single-process loss over all N.
    The local rows of the gathered tensors are replaced by `img_emb`/`spot_emb`, so gradients always reach the
    local embeddings; other rows carry gradient only if the gather did (e.g. torch.distributed.nn.all_gather).

    Args:
        img_emb, spot_emb: (b, D) image and spot embeddings of the same spots, row for row.
        temperature: T > 0.
        reduction: "none" (b,), "mean" or "sum" (scalars).

    Returns:
        float32 loss.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if img_emb.shape != spot_emb.shape or img_emb.ndim != 2:
        raise ValueError(
            f"img_emb and spot_emb must both be (B, D); got {tuple(img_emb.shape)} and {tuple(spot_emb.shape)}"
        )
    if (all_img_emb is None) != (all_spot_emb is None):
        raise ValueError("pass both all_img_emb and all_spot_emb, or neither")
    b = img_emb.shape[0]
    with torch.autocast(device_type=img_emb.device.type, enabled=False):
        img = img_emb.float()
        spot = spot_emb.float()
        if all_img_emb is None:
            all_img, all_spot, offset = img, spot, 0
        else:
            if all_img_emb.shape != all_spot_emb.shape or all_img_emb.shape[1:] != img_emb.shape[1:]:
                raise ValueError(
                    f"all_img_emb {tuple(all_img_emb.shape)} and all_spot_emb {tuple(all_spot_emb.shape)} must be "
                    f"(N, {img_emb.shape[1]})"
                )
            if not 0 <= offset <= all_img_emb.shape[0] - b:
                raise ValueError(
                    f"offset {offset} puts {b} local rows outside {all_img_emb.shape[0]} gathered rows"
                )
            all_img = _put_rows(all_img_emb.float(), img, offset)
            all_spot = _put_rows(all_spot_emb.float(), spot, offset)
        rows = slice(offset, offset + b)
        logits = spot @ all_img.T / temperature  # (b, N): rows of spot @ img.T
        logits_t = img @ all_spot.T / temperature  # (b, N): rows of (spot @ img.T).T
        similarity = (all_img @ all_img.T + all_spot @ all_spot.T) / 2 * temperature  # (N, N)
        targets = F.softmax(similarity, dim=-1)  # (N, N), rows sum to 1
        spots_loss = soft_cross_entropy(logits, targets[rows])  # (b,)
        images_loss = soft_cross_entropy(logits_t, targets[:, rows].T)  # (b,)
        loss = (spots_loss + images_loss) / 2.0  # (b,)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _put_rows(full: torch.Tensor, local: torch.Tensor, offset: int) -> torch.Tensor:
    """`full` with rows offset:offset + len(local) replaced by `local` (differentiably)."""
    return torch.cat([full[:offset], local, full[offset + local.shape[0] :]], dim=0)  # (N, D)


def mse_loss_fp32(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements, in float32."""
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        return F.mse_loss(prediction.float(), target.float())


def relative_reconstruction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error of batch-centred (B, D) vectors over the centred target's squared norm, in float32.

    The image embedding ends in a LayerNorm, so most of it is shared by every spot: its spread across spots is
    small next to its mean. A plain MSE against it is then mostly met by the shared part, and it also falls when
    spots' embeddings move closer together. Centring both sides on the batch mean leaves only what tells spots
    apart, and dividing by the target's spread makes the loss blind to that spread's scale (0: exact, 1: no
    better than the batch mean). A batch of one spot has nothing to tell apart and scores 0.
    """
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        p, t = prediction.float(), target.float()
        p, t = p - p.mean(dim=0, keepdim=True), t - t.mean(dim=0, keepdim=True)
        return (p - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
