"""Atomic file and folder writes: write to a temporary sibling, then rename over the target.

A killed process therefore leaves either the previous file or the new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _temp_sibling(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(fd)
    return Path(tmp_name)


def stage(target: str | Path, writer: Callable[[Path], object]) -> Path:
    """Run `writer(tmp)` on a temporary sibling of `target` and return the finished temporary file.

    For writes of several files that must land together: stage each, then `commit` them all. On error the
    temporary file is removed and the exception propagates.
    """
    tmp = _temp_sibling(Path(target))
    try:
        writer(tmp)
        _fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(staged: list[tuple[Path, Path]]) -> None:
    """Rename each staged (temporary, final) pair into place, in order."""
    for tmp, final in staged:
        os.replace(tmp, final)


def discard(staged: list[tuple[Path, Path]]) -> None:
    """Remove staged temporary files that will not be committed."""
    for tmp, _ in staged:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it onto `target`, on error remove it.

    The temporary name keeps the target's suffix so that libraries that dispatch on the extension
    (h5py, anndata, PIL, matplotlib) still work.
    """
    target = Path(target)
    tmp = _temp_sibling(target)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; on success it replaces `target` as a whole.

    An existing `target` is moved aside first and deleted only after the new folder is in place, so an
    interruption at any point leaves a complete folder (old or new) under one of the two names.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text(target: str | Path, text: str) -> None:
    """Atomically write a text file (UTF-8)."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""
    write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths: the common non-JSON types in this package
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _fsync_file(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    except OSError:  # some filesystems refuse fsync; the rename is still atomic
        pass
