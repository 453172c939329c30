"""One reader per input format; each returns a validated `Sample` (see `cmrcnet.data.sample`).

| format    | reader                     | input                                              |
|-----------|----------------------------|----------------------------------------------------|
| "st"      | `read_st_dir` / `read_st`  | her2st-style folder, or counts + spots (+ image)   |
| "visium"  | `read_visium`              | Space Ranger `outs/` folder                        |
| "hest"    | `read_hest`                | HEST-1k download folder + sample id                |
| "anndata" | `read_anndata`             | .h5ad with obsm["spatial"] (+ image)               |
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from cmrcnet.data.readers.anndata_reader import read_anndata
from cmrcnet.data.readers.hest import read_hest, read_hest_patches
from cmrcnet.data.readers.st import read_st, read_st_dir
from cmrcnet.data.readers.visium import read_10x_h5, read_visium
from cmrcnet.data.sample import Sample
from cmrcnet.errors import ConfigError

__all__ = [
    "FORMATS",
    "read_10x_h5",
    "read_anndata",
    "read_hest",
    "read_hest_patches",
    "read_sample",
    "read_st",
    "read_st_dir",
    "read_visium",
]

FORMATS = ("st", "visium", "hest", "anndata")


def read_sample(fmt: str, **kwargs: Any) -> Sample:
    """Read one sample in format `fmt` ("st", "visium", "hest" or "anndata").

    `input` names the main path for every format (ST folder, Space Ranger folder, HEST root, .h5ad file); for
    "st" without `input`, pass `counts`, `spots` and optionally `image`. Other keyword arguments go to the
    reader; options set to None that a reader does not take (e.g. `image` for "hest") are ignored, any other
    unknown option is a ConfigError.
    """
    fmt = fmt.lower().strip()
    if fmt not in FORMATS:
        raise ConfigError(f"unknown input format {fmt!r}; expected one of {list(FORMATS)}")
    kwargs = dict(kwargs)
    path = kwargs.pop("input", None)
    reader: Callable[..., Sample]
    args: tuple[Any, ...] = ()
    if fmt == "st":
        if path is not None:
            reader, args = read_st_dir, (path,)
        else:
            reader = read_st
    else:
        reader = {"visium": read_visium, "hest": read_hest, "anndata": read_anndata}[fmt]
        if path is None:
            raise ConfigError(f"format {fmt!r} needs an input path")
        args = (path,)
    params = inspect.signature(reader).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in params or v is not None}
    try:
        inspect.signature(reader).bind(*args, **kwargs)
    except TypeError as exc:
        accepted = [p for p in params if params[p].kind is inspect.Parameter.KEYWORD_ONLY]
        raise ConfigError(f"format {fmt!r}: {exc}; accepted options: {accepted}") from exc
    return reader(*args, **kwargs)
