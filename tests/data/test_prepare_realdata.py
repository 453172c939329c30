"""`cmrcnet prepare` on the real her2st sections and the Visium fixture (skipped when ../shared/data is absent)."""

from pathlib import Path

import pytest

from cmrcnet.cli import main
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.readers import read_sample

pytestmark = pytest.mark.realdata


@pytest.mark.parametrize("sid", ["C2", "C3", "C4", "C5", "C6", "B4"])
def test_prepare_her2st_section(sid: str, shared_data: Path, tmp_path: Path) -> None:
    joined = read_sample("st", input=shared_data / "her2st", sample_id=sid).n_spots
    rc = main(
        [
            "prepare",
            "--format",
            "st",
            "--input",
            str(shared_data / "her2st"),
            "--sample-id",
            sid,
            "--patient",
            sid[0],
            "--patch-px",
            "64",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert rc == 0
    ds = PreparedDataset(tmp_path)
    meta = ds.metadata(sid)
    assert len(ds.read_patches(sid).img) == joined == meta["n_spots"]
    # spot grid fit: ~290 px per 200 um array step (the README's 272 px is a nearest-neighbour median)
    assert 0.67 < meta["pixel_size_um"] < 0.71 and meta["pixel_size_source"] == "estimated"
    assert meta["patient"] == sid[0] and meta["n_padded_patches"] < 0.2 * joined


def test_prepare_expression_only_section(shared_data: Path, tmp_path: Path) -> None:
    rc = main(
        [
            "prepare",
            "--format",
            "st",
            "--input",
            str(shared_data / "her2st"),
            "--sample-id",
            "C1",
            "--patient",
            "C",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert rc == 0
    ds = PreparedDataset(tmp_path)
    assert not ds.has_image("C1") and ds.read_counts("C1").n_obs == 176


def test_prepare_visium_tiny(shared_data: Path, tmp_path: Path) -> None:
    rc = main(
        [
            "prepare",
            "--format",
            "visium",
            "--input",
            str(shared_data / "visium_tiny"),
            "--sample-id",
            "V1",
            "--patch-px",
            "32",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert rc == 0
    ds = PreparedDataset(tmp_path)
    assert len(ds.read_patches("V1").img) == 100
    assert ds.metadata("V1")["pixel_size_um"] == pytest.approx(0.727, abs=0.01)
