"""cmrcnet: spatial gene expression from H&E histology (CMRCNet, Medical Image Analysis 2025).

The Python API (`cmrcnet.api`) is re-exported here: `read`, `prepare`, `train` (returns a `Model`),
`Model.predict` / `predict`, `predict_slide`, `evaluate` and `cv`. They are imported on first use, so
``import cmrcnet`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("Model", "cv", "evaluate", "predict", "predict_slide", "prepare", "read", "train")

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from cmrcnet import api

        return getattr(api, name)
    raise AttributeError(f"module 'cmrcnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
