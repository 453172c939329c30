"""Batch augmentation (dihedral transforms, colour, stain and resolution jitter), the learning-rate schedule
and batching."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from cmrcnet.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, images_to_float
from cmrcnet.training.schedule import index_batches as _batches
from cmrcnet.training.schedule import lr_at
from cmrcnet.training.spots import augment

S = 6  # image side: small, and every pixel distinct so each dihedral variant is recognisable


def _distinct_image() -> torch.Tensor:
    """(S, S, 3) uint8 whose pixels all differ (so no two of the 8 dihedral transforms coincide)."""
    base = torch.arange(S * S, dtype=torch.uint8).view(S, S)  # (S, S)
    return torch.stack([base, base + 40, base * 2 + 100], dim=-1)  # (S, S, 3)


def _dihedral_variants(image: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square applied to (S, S, 3)."""
    out = []
    for flipped in (image, image.flip(1)):
        out += [torch.rot90(flipped, k, dims=(0, 1)) for k in range(4)]
    return out


def _random_batch(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, S, S, 3), generator=g, dtype=torch.uint8)  # (n, S, S, 3)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: (B, 3, S, S) float -> (B, S, S, 3) uint8."""
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * s + m).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, S, S, 3)


def test_no_augmentation_is_plain_normalisation() -> None:
    images = _random_batch(5)
    out = augment(images, torch.Generator().manual_seed(0), flips=False, rot90=False)
    assert out.shape == (5, 3, S, S) and out.dtype == torch.float32
    torch.testing.assert_close(out, images_to_float(images), rtol=0, atol=1e-6)


def test_dihedral_transforms_keep_every_pixel_value() -> None:
    images = _random_batch(32)
    before = images.clone()
    plain = augment(images, torch.Generator(), flips=False, rot90=False)  # (B, 3, S, S)
    out = augment(images, torch.Generator().manual_seed(1), flips=True, rot90=True)
    assert torch.equal(images, before)  # the input is not modified
    assert not torch.equal(out, plain)  # something moved
    # per image and channel, the same multiset of values: only positions change
    sorted_out = out.flatten(2).sort(dim=-1).values  # (B, 3, S*S)
    sorted_plain = plain.flatten(2).sort(dim=-1).values  # (B, 3, S*S)
    assert torch.equal(sorted_out, sorted_plain)


@pytest.mark.parametrize(
    ("flips", "rot90", "expected"),
    [
        (True, True, set(range(8))),
        (True, False, {0, 2, 4, 6}),  # identity, rot180, and the two axis flips
        (False, True, {0, 1, 2, 3}),  # the four rotations
        (False, False, {0}),
    ],
)
def test_all_dihedral_variants_appear(flips: bool, rot90: bool, expected: set[int]) -> None:
    image = _distinct_image()
    variants = _dihedral_variants(image)
    assert len({v.numpy().tobytes() for v in variants}) == 8
    batch = image.expand(400, S, S, 3).contiguous()  # (400, S, S, 3)
    out = _to_uint8(augment(batch, torch.Generator().manual_seed(0), flips=flips, rot90=rot90))
    seen = Counter()
    for img in out:
        matches = [i for i, v in enumerate(variants) if torch.equal(img, v)]
        assert len(matches) == 1, "an output is not a dihedral transform of the input"
        seen[matches[0]] += 1
    assert set(seen) == expected
    for count in seen.values():  # roughly uniform: 400 / len(expected) each
        assert count > 0.5 * 400 / len(expected)


def test_same_seed_same_output_other_seed_differs() -> None:
    images = _random_batch(16)
    kwargs = dict(flips=True, rot90=True, color_jitter=0.2)
    a = augment(images, torch.Generator().manual_seed(7), **kwargs)
    b = augment(images, torch.Generator().manual_seed(7), **kwargs)
    c = augment(images, torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_color_jitter_stays_in_the_colour_range() -> None:
    images = torch.cat([_random_batch(30), torch.zeros(1, S, S, 3, dtype=torch.uint8)])
    images[-1] = 255  # a white patch
    out = augment(images, torch.Generator().manual_seed(0), flips=False, rot90=False, color_jitter=1.0)
    back = out * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
    assert not torch.allclose(out, images_to_float(images))


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) model input -> colours on a 0-1 scale."""
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def test_stain_jitter_scales_optical_density_per_image_and_channel() -> None:
    """Each image's channels are od * a + c in optical density: a pixel twice as dense as another stays
    (about) twice as dense, glass stays near white, and images get different balances."""
    base = torch.full((40, 8, 8, 3), 200, dtype=torch.uint8)
    base[:, :4] = 100  # top half denser
    base[:, :, :, 2] = 255  # blue channel: white glass
    out = _unnormalise(augment(base, torch.Generator().manual_seed(0), flips=False, rot90=False, stain_jitter=0.3))
    od = -torch.log(out.clamp(min=1 / 255))  # (B, 3, 8, 8)
    assert od.min() >= 0 and out.max() <= 1 + 1e-6
    dense, light = od[:, :2, 0, 0], od[:, :2, -1, 0]  # (B, 2) red and green, top vs bottom
    od_dense, od_light = math.log(255 / 100), math.log(255 / 200)
    a = (dense - light) / (od_dense - od_light)  # od' = a od + c, one (a, c) per image and channel
    c = light - a * od_light
    assert a.min() >= 0.7 - 1e-4 and a.max() <= 1.3 + 1e-4 and a.std() > 0.05
    assert c.abs().max() <= 0.25 * 0.3 + 1e-4
    assert out[:, 2].min() > math.exp(-0.25 * 0.3) - 1e-4  # glass at most a faint tint
    assert dense[:, 0].std() > 0.02  # images differ in stain strength
    assert not torch.allclose(dense[:, 0], dense[:, 1])  # and channels differ within an image


def test_resolution_jitter_blurs_fine_detail_of_some_patches_and_keeps_flat_ones() -> None:
    side = 32
    checker = ((torch.arange(side).view(-1, 1) + torch.arange(side).view(1, -1)) % 2 * 255).to(torch.uint8)
    images = checker.view(1, side, side, 1).expand(64, side, side, 3).contiguous()  # finest possible detail
    out = _unnormalise(augment(images, torch.Generator().manual_seed(0), flips=False, rot90=False, scale_jitter=8))
    contrast = out.flatten(1).std(dim=1)  # (B,)
    sharp = _unnormalise(images_to_float(images)).flatten(1).std(dim=1)
    assert (contrast < 0.5 * sharp).float().mean() > 0.5  # most patches lost the single-pixel pattern
    assert (contrast > 0.99 * sharp).any()  # factor 1 is one of the levels: some stay as they were
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.full((64,), 0.5), atol=0.03)  # mean colour kept
    flat = torch.full((8, side, side, 3), 180, dtype=torch.uint8)
    torch.testing.assert_close(
        augment(flat, torch.Generator(), flips=False, rot90=False, scale_jitter=8), images_to_float(flat),
        rtol=0, atol=1e-5,
    )


def test_stain_and_resolution_jitter_are_seeded() -> None:
    images = _random_batch(16)
    kwargs = dict(flips=False, rot90=False, stain_jitter=0.3, scale_jitter=4.0)
    a = augment(images, torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a, augment(images, torch.Generator().manual_seed(3), **kwargs))
    assert not torch.equal(a, augment(images, torch.Generator().manual_seed(4), **kwargs))


@pytest.mark.parametrize(("field", "value"), [("stain_jitter", -0.1), ("stain_jitter", 1.0), ("scale_jitter", 0.5)])
def test_jitter_settings_are_checked(field: str, value: float) -> None:
    from cmrcnet.errors import ConfigError
    from cmrcnet.run.config import TrainConfig

    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value}).validate()


# --------------------------------------------------------------------------------------- learning rate
def test_lr_warmup_rises_linearly_to_the_peak() -> None:
    lrs = [lr_at(s, total=100, warmup=10, lr=1e-3, min_lr=1e-5) for s in range(10)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-3)
    assert all(b - a == pytest.approx(1e-4) for a, b in itertools.pairwise(lrs))


def test_lr_cosine_endpoints_and_midpoint() -> None:
    def at(step: int, warmup: int = 10) -> float:
        return lr_at(step, total=110, warmup=warmup, lr=1e-3, min_lr=1e-5)

    assert at(10) == pytest.approx(1e-3)  # the peak right after warm-up
    assert at(60) == pytest.approx((1e-3 + 1e-5) / 2)  # half-way down the cosine
    assert at(110) == pytest.approx(1e-5) and at(500) == pytest.approx(1e-5)  # floor, also past the end
    steps = [at(s) for s in range(10, 111)]
    assert all(b <= a for a, b in itertools.pairwise(steps))
    assert at(0, warmup=0) == pytest.approx(1e-3)  # no warm-up: start at the peak
    assert lr_at(0, total=1, warmup=0, lr=1e-3, min_lr=0.0) == pytest.approx(1e-3)
    assert not math.isnan(lr_at(5, total=5, warmup=5, lr=1e-3, min_lr=0.0))


# --------------------------------------------------------------------------------------- batches
def test_batches_are_full_and_a_permutation() -> None:
    g = torch.Generator().manual_seed(0)
    batches = _batches(23, 8, g, shuffle=True)
    assert [len(b) for b in batches] == [8, 8]  # the incomplete tail is dropped
    assert len(set(torch.cat(batches).tolist())) == 16
    assert [b.tolist() for b in _batches(5, 8, g, shuffle=False)] == [[0, 1, 2, 3, 4]]  # n < batch: one batch
