"""Checkpoints that can never run code: plain tensors and JSON-like values, loaded with weights_only=True."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from cmrcnet import __version__
from cmrcnet.atomic import atomic_path
from cmrcnet.errors import CheckpointError, require_file

logger = logging.getLogger(__name__)

FORMAT = "cmrcnet-checkpoint-v1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomically save `payload` (tensors, numbers, strings, lists, dicts only) with a format tag."""
    data = {"format": FORMAT, "cmrcnet_version": __version__, **payload}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, refusing anything that would need to run code."""
    path = require_file(path, "checkpoint")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # torch's safe unpickler met a class or function
            raise CheckpointError(
                "refused: the file contains objects other than tensors and plain data (it could run code); "
                "only checkpoints written by cmrcnet are accepted",
                path=path,
            ) from exc
        raise CheckpointError(
            "cannot read checkpoint: refused by torch's safe loader (corrupt, or not a plain-data checkpoint "
            "written by cmrcnet)",
            path=path,
        ) from exc
    # truncated or garbled files fail in many ways (RuntimeError, EOFError, KeyError, ...)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint ({type(exc).__name__}: {exc})", path=path) from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"not a cmrcnet checkpoint (expected format {FORMAT!r})", path=path)
    return data
