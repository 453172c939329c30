import json
from pathlib import Path

import numpy as np
import pytest

from cmrcnet.data import dataset as dataset_mod
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.prepare import prepare_sample
from cmrcnet.errors import InputFileError

from sample_factory import make_sample


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_round_trip(tmp_path: Path) -> None:
    sample = make_sample("s1", patient_id="P1")
    summary = prepare_sample(sample, tmp_path, fov_um=30.0, patch_px=16, progress=False)
    assert summary.n_patches == sample.n_spots == 20 and summary.n_padded == 0
    ds = PreparedDataset(tmp_path)
    assert ds.sample_ids() == ["s1"] and ds.patient("s1") == "P1"
    counts = ds.read_counts("s1")
    patches = ds.read_patches("s1")
    assert patches.img.shape == (20, 16, 16, 3) and patches.img.dtype == np.uint8
    assert patches.barcodes == list(counts.obs_names)
    # HEST convention: coords are top-left corners; centres live in the h5ad
    np.testing.assert_allclose(patches.coords, np.round(counts.obsm["spatial"] - 15.0))
    meta = ds.metadata("s1")
    assert meta["fov_um"] == 30.0 and meta["pixel_size_um"] == 1.0 and meta["has_image"]
    assert ds.thumbnail("s1") is not None


def test_expression_only_sample_has_no_patches(tmp_path: Path) -> None:
    prepare_sample(make_sample("c1", image=False), tmp_path, progress=False)
    ds = PreparedDataset(tmp_path)
    assert not ds.has_image("c1") and ds.read_counts("c1").n_obs == 20
    with pytest.raises(InputFileError, match="expression-only"):
        ds.read_patches("c1")


def test_failed_replacement_leaves_dataset_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepare_sample(make_sample("s1"), tmp_path, fov_um=30.0, patch_px=16, progress=False)
    before = _snapshot(tmp_path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(dataset_mod, "_write_thumbnail", boom)  # fails after counts and patches are staged
    with pytest.raises(OSError, match="disk full"):
        prepare_sample(make_sample("s1", seed=5), tmp_path, fov_um=30.0, patch_px=16, progress=False)
    assert _snapshot(tmp_path) == before


def test_preparing_twice_replaces_the_sample(tmp_path: Path) -> None:
    prepare_sample(make_sample("s1", n_rows=3), tmp_path, fov_um=30.0, patch_px=16, progress=False)
    prepare_sample(make_sample("s1", n_rows=2), tmp_path, fov_um=30.0, patch_px=16, progress=False)
    ds = PreparedDataset(tmp_path)
    assert ds.read_counts("s1").n_obs == 10 and len(ds.read_patches("s1").img) == 10
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary files left


def test_mixed_versions_are_detected(tmp_path: Path) -> None:
    prepare_sample(make_sample("s1"), tmp_path, fov_um=30.0, patch_px=16, progress=False)
    meta_path = tmp_path / "metadata" / "s1.json"
    meta = json.loads(meta_path.read_text())
    meta["content_id"] = "something-else"  # as if a prepare was killed between renames
    meta_path.write_text(json.dumps(meta))
    ds = PreparedDataset(tmp_path)
    with pytest.raises(InputFileError, match="interrupted prepare"):
        ds.read_counts("s1")
    with pytest.raises(InputFileError, match="interrupted prepare"):
        ds.read_patches("s1")


def test_not_a_dataset_and_unknown_sample(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="not a prepared dataset"):
        PreparedDataset(tmp_path)
    prepare_sample(make_sample("s1"), tmp_path, fov_um=30.0, patch_px=16, progress=False)
    with pytest.raises(InputFileError, match="not in this dataset"):
        PreparedDataset(tmp_path).require(["s2"])


def test_truncated_patches_file_is_a_clear_error(tmp_path: Path) -> None:
    prepare_sample(make_sample("s1"), tmp_path, fov_um=30.0, patch_px=16, progress=False)
    h5 = tmp_path / "patches" / "s1.h5"
    h5.write_bytes(h5.read_bytes()[:2000])
    with pytest.raises(InputFileError, match=r"s1\.h5.*cannot read patches"):
        PreparedDataset(tmp_path).read_patches("s1")


@pytest.mark.parametrize(
    ("technology", "source", "fov"),
    [
        ("st", {}, 224.0),  # legacy ST: spots 200 um apart, patches cover the spot and its surroundings
        ("hest", {"st_technology": "spatial transcriptomics"}, 224.0),  # a HEST-1k sample of legacy ST
        ("hest", {"st_technology": "visium"}, 112.0),
        ("visium", {}, 112.0),
        ("synthetic", {}, 112.0),
        ("unknown", {}, 112.0),
    ],
)
def test_the_default_field_of_view_follows_the_technology(
    tmp_path: Path, technology: str, source: dict, fov: float
) -> None:
    from cmrcnet.constants import DEFAULT_FOV_UM, ST_FOV_UM
    from cmrcnet.data.prepare import default_fov_um

    assert (DEFAULT_FOV_UM, ST_FOV_UM) == (112.0, 224.0)
    sample = make_sample("s1", pitch_px=120.0, margin_px=120.0, pixel_size_um=2.0)
    sample.technology, sample.source = technology, {**sample.source, **source}
    assert default_fov_um(sample) == fov
    summary = prepare_sample(sample, tmp_path, patch_px=16, progress=False)  # no fov_um: the default
    assert PreparedDataset(tmp_path).metadata("s1")["fov_um"] == fov == summary.fov_um
    assert f"of {fov:g} um" in "\n".join(summary.lines())
    again = make_sample("s1", pitch_px=120.0, margin_px=120.0, pixel_size_um=2.0)
    again.technology, again.source = technology, {**again.source, **source}
    prepare_sample(again, tmp_path, fov_um=30.0, patch_px=16, progress=False)  # one given wins
    assert PreparedDataset(tmp_path).metadata("s1")["fov_um"] == 30.0
