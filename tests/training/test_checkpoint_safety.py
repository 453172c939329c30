"""`load_checkpoint` never runs code from a file and names the file whenever it refuses one."""

from __future__ import annotations

import pathlib
import pickle
import re
from pathlib import Path

import pytest
import torch

from cmrcnet.errors import CheckpointError, InputFileError
from cmrcnet.run.checkpoint import FORMAT, load_checkpoint, save_checkpoint


class _TouchOnUnpickle:
    """Unpickling this object calls Path.touch(marker): a stand-in for arbitrary code in a malicious file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _names_file(path: Path) -> str:
    return re.escape(str(path))


def test_the_crafted_pickle_really_runs_code_when_loaded_unsafely(tmp_path: Path) -> None:
    # positive control: the payload used below is dangerous, so refusing it means something
    marker = tmp_path / "pwned-unsafe"
    torch.save({"format": FORMAT, "x": _TouchOnUnpickle(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("where", ["inside_a_tagged_dict", "top_level"])
def test_crafted_pickle_is_refused_without_running(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    evil = _TouchOnUnpickle(marker)
    payload = {"format": FORMAT, "model": {"w": torch.ones(2)}, "x": evil} if where != "top_level" else evil
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"refused: .*could run code") as info:
        load_checkpoint(path)
    assert info.value.path == path and str(path) in str(info.value)
    assert not marker.exists()


def test_raw_pickle_with_code_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": FORMAT, "x": _TouchOnUnpickle(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=_names_file(path)):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.5, 0.1, 100, 10, 0])
def test_truncated_checkpoint_is_an_error_naming_the_file(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.randn(64, 64)}, "epoch": 3})
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=rf"{_names_file(path)}: cannot read checkpoint") as info:
        load_checkpoint(path)
    assert info.value.path == path


@pytest.mark.parametrize("content", [b"hello world", b"not a checkpoint at all", b"PK\x03\x04junk"])
def test_garbage_is_an_error_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{_names_file(path)}: cannot read checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "payload",
    [{"model": {"w": torch.ones(3)}, "epoch": 1}, {"format": "someone-else-v1"}, torch.ones(3), [1, 2]],
    ids=["untagged_dict", "other_tag", "tensor", "list"],
)
def test_plain_torch_file_without_our_tag_is_refused(tmp_path: Path, payload: object) -> None:
    path = tmp_path / "plain.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"not a cmrcnet checkpoint \(expected format '{FORMAT}'\)"):
        load_checkpoint(path)


def test_missing_checkpoint_is_an_input_file_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_round_trip_is_exact_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    payload = {
        "model": {"w": torch.randn(4, 4), "n": torch.tensor(3)},
        "history": [{"loss": 1.5}],
        "epoch": 2,
    }
    path = tmp_path / "ck.pt"
    save_checkpoint(path, payload)
    loaded = load_checkpoint(path)
    assert loaded["format"] == FORMAT and loaded["epoch"] == 2 and loaded["history"] == [{"loss": 1.5}]
    assert torch.equal(loaded["model"]["w"], payload["model"]["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
