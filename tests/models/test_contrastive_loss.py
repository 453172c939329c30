"""The BLEEP soft-target contrastive loss against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmrcnet.models import contrastive_loss


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _expected(img: np.ndarray, spot: np.ndarray, t: float) -> np.ndarray:
    """METHOD.md step 4 written out element by element."""
    n = len(img)
    logits = np.array([[spot[i] @ img[j] / t for j in range(n)] for i in range(n)])
    sim = np.array([[(img[i] @ img[j] + spot[i] @ spot[j]) / 2 * t for j in range(n)] for i in range(n)])
    targets = _softmax_rows(sim)
    out = np.zeros(n)
    for i in range(n):
        log_p_row = logits[i] - np.log(np.exp(logits[i]).sum())  # spots -> images
        log_p_col = logits[:, i] - np.log(np.exp(logits[:, i]).sum())  # images -> spots
        spots_loss = -(targets[i] * log_p_row).sum()
        images_loss = -(targets[:, i] * log_p_col).sum()
        out[i] = (spots_loss + images_loss) / 2
    return out


IMG = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
SPOT = np.array([[0.5, 0.5], [1.0, -1.0], [0.0, 2.0]])


@pytest.mark.parametrize("t", [1.0, 0.5])
def test_matches_hand_computation_3x3(t: float) -> None:
    got = contrastive_loss(torch.tensor(IMG), torch.tensor(SPOT), temperature=t)
    np.testing.assert_allclose(got.numpy(), _expected(IMG, SPOT, t), rtol=1e-5)
    assert got.dtype == torch.float32


def test_known_value_identity_embeddings() -> None:
    # img = spot = I (3x3): logits = I, targets = softmax(I) rows = (e, 1, 1) / (e + 2) on the diagonal first
    eye = torch.eye(3)
    p_diag = np.e / (np.e + 2)
    p_off = 1 / (np.e + 2)
    expected = -(p_diag * np.log(p_diag) + 2 * p_off * np.log(p_off))
    got = contrastive_loss(eye, eye)
    np.testing.assert_allclose(got.numpy(), [expected] * 3, rtol=1e-6)


def test_reductions() -> None:
    img, spot = torch.tensor(IMG), torch.tensor(SPOT)
    per_sample = contrastive_loss(img, spot)
    assert per_sample.shape == (3,)
    assert torch.allclose(contrastive_loss(img, spot, reduction="mean"), per_sample.mean())
    assert torch.allclose(contrastive_loss(img, spot, reduction="sum"), per_sample.sum())
    with pytest.raises(ValueError, match="reduction must be one of"):
        contrastive_loss(img, spot, reduction="max")


def test_local_rows_against_gathered_columns_match_the_full_loss() -> None:
    g = torch.Generator().manual_seed(1)
    img, spot = torch.randn(10, 4, generator=g), torch.randn(10, 4, generator=g)
    full = contrastive_loss(img, spot)
    parts = [
        contrastive_loss(img[a:b], spot[a:b], all_img_emb=img, all_spot_emb=spot, offset=a)
        for a, b in [(0, 3), (3, 7), (7, 10)]
    ]
    torch.testing.assert_close(torch.cat(parts), full)


def test_gradient_reaches_local_rows_when_gathered_rows_are_detached() -> None:
    img = torch.randn(6, 4, requires_grad=True)
    spot = torch.randn(6, 4, requires_grad=True)
    local = contrastive_loss(
        img[2:4], spot[2:4], all_img_emb=img.detach(), all_spot_emb=spot.detach(), offset=2, reduction="sum"
    )
    local.backward()
    assert img.grad[2:4].abs().sum() > 0 and img.grad[:2].abs().sum() == 0


def test_fp32_under_bf16_autocast() -> None:
    img, spot = torch.tensor(IMG, dtype=torch.bfloat16), torch.tensor(SPOT, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_loss(img, spot)
    assert got.dtype == torch.float32
    expected = _expected(img.float().numpy(), spot.float().numpy(), 1.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="must both be"):
        contrastive_loss(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="offset 5"):
        contrastive_loss(
            torch.zeros(3, 2),
            torch.zeros(3, 2),
            all_img_emb=torch.zeros(6, 2),
            all_spot_emb=torch.zeros(6, 2),
            offset=5,
        )
