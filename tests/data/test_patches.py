import numpy as np
import pytest

from cmrcnet.data.image import SlideImage
from cmrcnet.data.patches import extract_patches
from cmrcnet.errors import ConfigError


def _marker_image(h: int, w: int, cx: int, cy: int, r: int = 3) -> np.ndarray:
    img = np.full((h, w, 3), 255, np.uint8)
    img[cy - r : cy + r + 1, cx - r : cx + r + 1] = (255, 0, 0)  # red square centred on (cx, cy)
    return img


def _centroid_of_red(patch: np.ndarray) -> tuple[float, float]:
    red = (patch[..., 0] > 200) & (patch[..., 1] < 128)
    ys, xs = np.nonzero(red)
    return float(xs.mean()), float(ys.mean())


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize(("fov_px", "out_px"), [(64.0, 32), (40.0, 80), (51.0, 51)])
def test_marker_at_spot_lands_at_patch_centre(scale: float, fov_px: float, out_px: int) -> None:
    # a marker drawn at a known full-resolution spot must sit at the patch centre whatever the scales
    cx_full, cy_full = 150, 110
    img = _marker_image(int(300 * scale), int(400 * scale), int(cx_full * scale), int(cy_full * scale))
    image = SlideImage.from_array(img, "memory://marker.png", scale=scale)
    ps = extract_patches(
        image,
        np.array([[cx_full + 0.5 / scale, cy_full + 0.5 / scale]]),
        ["a"],
        pixel_size_um=0.5,
        fov_um=fov_px * 0.5,
        patch_px=out_px,
        progress=False,
    )
    assert ps.img.shape == (1, out_px, out_px, 3) and ps.img.dtype == np.uint8
    mx, my = _centroid_of_red(ps.img[0])
    centre = (out_px - 1) / 2
    tol = max(1.0, out_px / (fov_px * scale))  # one source pixel
    assert abs(mx - centre) <= tol and abs(my - centre) <= tol
    assert ps.outside_fraction[0] == 0


def test_patch_covers_fixed_field_of_view() -> None:
    # two slides of the same "tissue" at different resolutions give the same patch content
    base = np.zeros((200, 200, 3), np.uint8)
    base[:, :100] = 255  # left half white, right half black
    hi = np.repeat(np.repeat(base, 2, axis=0), 2, axis=1)  # same tissue at twice the resolution
    p_lo = extract_patches(
        SlideImage.from_array(base, "lo"),
        np.array([[100.0, 100.0]]),
        ["a"],
        pixel_size_um=1.0,
        fov_um=40.0,
        patch_px=20,
        progress=False,
    )
    p_hi = extract_patches(
        SlideImage.from_array(hi, "hi"),
        np.array([[200.0, 200.0]]),
        ["a"],
        pixel_size_um=0.5,
        fov_um=40.0,
        patch_px=20,
        progress=False,
    )
    assert np.abs(p_lo.img.astype(int) - p_hi.img.astype(int)).max() <= 2
    assert p_lo.fov_px == 40.0 and p_hi.fov_px == 80.0


def test_border_patches_are_padded_white_and_counted() -> None:
    img = np.zeros((100, 100, 3), np.uint8)  # black image
    ps = extract_patches(
        SlideImage.from_array(img, "black"),
        np.array([[0.0, 50.0], [50.0, 50.0]]),
        ["edge", "mid"],
        pixel_size_um=1.0,
        fov_um=40.0,
        patch_px=40,
        progress=False,
    )
    assert ps.n_padded == 1
    assert ps.outside_fraction[0] == pytest.approx(0.5, abs=0.03)
    left, right = ps.img[0][:, :18], ps.img[0][:, 22:]
    assert (left == 255).all() and (right == 0).all()  # padded half is white, inside half is the image
    assert (ps.img[1] == 0).all()


def test_bad_geometry_is_a_config_error() -> None:
    image = SlideImage.from_array(np.zeros((10, 10, 3), np.uint8), "x")
    with pytest.raises(ConfigError, match="field of view"):
        extract_patches(
            image, np.zeros((1, 2)), ["a"], pixel_size_um=1, fov_um=0, patch_px=32, progress=False
        )


def test_patch_fully_inside_has_exactly_zero_outside_fraction() -> None:
    # float round-off used to report 2e-16 "outside" for patches well inside the image
    img = np.zeros((1000, 1000, 3), np.uint8)
    ps = extract_patches(
        SlideImage.from_array(img, "x"),
        np.array([[2307.86 / 3, 3500.48 / 4]]),
        ["a"],
        pixel_size_um=0.6894,
        fov_um=112.0,
        patch_px=16,
        progress=False,
    )
    assert ps.outside_fraction[0] == 0.0 and ps.n_padded == 0
