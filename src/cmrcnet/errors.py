"""Errors a user can cause and fix. The CLI turns them into one line on stderr and exit code 2."""

from __future__ import annotations

import re
from pathlib import Path


class CmrcnetError(Exception):
    """A user error (bad input file, bad option, incompatible checkpoint).

    The message must name the file (when there is one) and the problem, so a user can act on it without a
    traceback.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        # one line, even when it quotes a library's multi-line message (YAML, pandas, h5py)
        self.problem = re.sub(r"\s*\n\s*", " ", str(message).strip())
        super().__init__(f"{self.path}: {self.problem}" if self.path is not None else self.problem)


class InputFileError(CmrcnetError):
    """A missing, unreadable, truncated or malformed input file."""


class ConfigError(CmrcnetError):
    """A bad configuration value or option combination."""


class CheckpointError(CmrcnetError):
    """A checkpoint or bank that cannot be loaded safely or does not fit this version."""


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return `path` as a Path if it is an existing regular file, else raise a clear InputFileError."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{what} not found", path=p)
    if not p.is_file():
        raise InputFileError(f"{what} is not a regular file", path=p)
    return p


def require_dir(path: str | Path, what: str = "folder") -> Path:
    """Return `path` as a Path if it is an existing directory, else raise a clear InputFileError."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{what} not found", path=p)
    if not p.is_dir():
        raise InputFileError(f"{what} is not a folder", path=p)
    return p
