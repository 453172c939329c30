"""Slide-level colour normalisation (cmrcnet.data.stain): the "contrast" rule (default) and Reinhard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cmrcnet.data.stain import (
    COLOUR_CAST,
    LabStats,
    colour_cast,
    describe,
    lab_stats,
    load_stain_reference,
    normalise_table,
    normalise_to,
    reinhard,
    save_stain_reference,
    slide_target,
)
from cmrcnet.errors import ConfigError, InputFileError


def _patches(rgb: tuple[int, int, int], seed: int, n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.array(rgb, dtype=np.float64)
    noise = rng.normal(0, 18, size=(n, 16, 16, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)  # (n, 16, 16, 3) tissue-like colours


def test_reinhard_maps_a_slide_onto_the_target_statistics() -> None:
    target = lab_stats(_patches((200, 120, 170), seed=0))  # pink H&E-like
    source = _patches((120, 150, 190), seed=1)  # bluish, another stain balance
    out = normalise_to(source, target, rule="reinhard")
    assert out.dtype == np.uint8 and out.shape == source.shape
    got = lab_stats(out)
    np.testing.assert_allclose(got.mean, target.mean, atol=2.0)
    np.testing.assert_allclose(got.std, target.std, rtol=0.15, atol=1.5)


def test_the_contrast_rule_corrects_a_colour_cast_but_keeps_the_lightness() -> None:
    target = lab_stats(_patches((200, 120, 170), seed=0))
    source = _patches((160, 185, 225), seed=1)  # pale and bluish: a cast far above COLOUR_CAST
    before = lab_stats(source)
    assert colour_cast(before, target) > 2 * COLOUR_CAST
    got = lab_stats(normalise_to(source, target))  # the default rule
    assert got.mean[0] == pytest.approx(before.mean[0], abs=2.0)  # lightness kept
    assert abs(got.mean[0] - target.mean[0]) > 10
    np.testing.assert_allclose(got.mean[1:], target.mean[1:], atol=2.0)  # colour cast corrected
    np.testing.assert_allclose(got.std, target.std, rtol=0.15, atol=1.5)  # contrast matched
    assert "corrected" in describe(before, target, "contrast")


def test_the_contrast_rule_keeps_a_small_colour_difference() -> None:
    """Sections of one study differ by a few units of colour (her2st: 2.8-4.3); that is tissue, not a cast."""
    target = lab_stats(_patches((200, 120, 170), seed=0))
    source = _patches((185, 112, 168), seed=4)  # a little darker and less red
    before = lab_stats(source)
    assert 1.0 < colour_cast(before, target) < COLOUR_CAST
    got = lab_stats(normalise_to(source, target))
    np.testing.assert_allclose(got.mean, before.mean, atol=1.5)  # lightness and colour kept
    np.testing.assert_allclose(got.std, target.std, rtol=0.15, atol=1.5)
    assert "kept" in describe(before, target, "contrast")
    mapped = slide_target(before, target)
    assert mapped.mean == [before.mean[0], *before.mean[1:]] and mapped.std == target.std
    assert slide_target(before, target, rule="reinhard") is target
    with pytest.raises(ConfigError, match="unknown stain normalisation rule"):
        slide_target(before, target, rule="macenko")


def test_a_table_is_mapped_sample_by_sample() -> None:
    """Each sample of a SpotTable gets its own source statistics: two sections with different stain balances
    both land on the target, and their spots stay in place."""
    import torch

    from cmrcnet.data.spots import SpotTable

    target = lab_stats(_patches((200, 120, 170), seed=0))
    a, b = _patches((120, 150, 190), seed=1), _patches((230, 170, 200), seed=3)
    images = torch.from_numpy(np.concatenate([a, b]))
    table = SpotTable(images.clone(), torch.zeros(12, 0), ["A"] * 6 + ["B"] * 6, [f"s{i}" for i in range(12)],
                      np.zeros((12, 2)))
    done = normalise_table(table, target, rule="reinhard")
    assert list(done) == ["A", "B"]
    for rows, original in ((slice(0, 6), a), (slice(6, 12), b)):
        part = table.images[rows].numpy()
        np.testing.assert_allclose(lab_stats(part).mean, target.mean, atol=2.0)
        np.testing.assert_array_equal(part, normalise_to(original, target, rule="reinhard"))  # own statistics
    assert lab_stats(a).mean[2] < lab_stats(b).mean[2] - 5  # the two really differed before


def test_same_statistics_change_nothing_but_rounding() -> None:
    images = _patches((190, 110, 160), seed=2)
    stats = lab_stats(images)
    out = reinhard(images, stats, stats)
    assert np.abs(out.astype(int) - images.astype(int)).max() <= 2


def test_black_background_becomes_white_and_white_stays() -> None:
    images = _patches((190, 110, 160), seed=3)
    images[:, :4] = 0  # black export background
    images[:, -4:] = 255  # white glass
    out = normalise_to(images, lab_stats(_patches((200, 120, 170), seed=0)))
    assert (out[:, :4] >= 250).all() and (out[:, -4:] >= 250).all()


def test_errors_and_the_reference_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="uint8"):
        reinhard(np.zeros((1, 4, 4, 3), dtype=np.float32), LabStats([0] * 3, [1] * 3, 1), LabStats([0] * 3, [1] * 3, 1))
    with pytest.raises(ConfigError, match="tissue pixels"):
        lab_stats(np.full((2, 8, 8, 3), 255, dtype=np.uint8))  # only white background
    stats = lab_stats(_patches((200, 120, 170), seed=0))
    path = save_stain_reference(stats, tmp_path / "stain_reference.json")
    assert load_stain_reference(path) == stats
    with pytest.raises(InputFileError, match="no stain reference"):
        load_stain_reference(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(InputFileError, match="not a cmrcnet stain reference"):
        load_stain_reference(tmp_path / "bad.json")
