"""Checking a vendor's weights file against a registry entry, before anything large is built or read.

Users keep the weights as they downloaded them: `pytorch_model.bin`, `model.safetensors`, or the folder holding
one of them (a Hugging Face snapshot). Tensors are read with safetensors or `torch.load(weights_only=True)`, never
unpickled. `check_weights_file` compares the file's tensor names and shapes (read lazily: safetensors headers, or
a memory-mapped torch file) with the architecture built on the meta device, after stripping a wrapper prefix
("module.", "model.", "encoder.", "trunk.", "visual.", ...), and stops at the first tensor that does not fit, so a
wrong file fails in a second with one line naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cmrcnet.errors import CheckpointError
from cmrcnet.models.foundation.registry import FoundationSpec

logger = logging.getLogger(__name__)

# files looked for, in this order, when the weights are given as a folder
WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "encoder.safetensors",
    "checkpoint.pth",
    "model.pth",
)


def resolve_weights_path(path: str | Path) -> Path:
    """A weights file, or the weights file inside a checkpoint folder (the first of WEIGHT_FILES it holds, else
    its only .safetensors / .bin / .pt / .pth file)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    found = sorted(
        p for ext in ("safetensors", "bin", "pt", "pth") for p in path.glob(f"*.{ext}") if p.is_file()
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f"holds no weights file (looked for {', '.join(WEIGHT_FILES)})", path=path)
    raise CheckpointError(
        f"holds {len(found)} weights files ({', '.join(p.name for p in found[:4])}); name the one to use",
        path=path,
    )


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a weights file, without reading the tensors' data where the format allows."""
    from cmrcnet.models.encoders import read_state_dict

    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"not a readable safetensors file ({exc})", path=path) from exc
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def expected_shapes(spec: FoundationSpec) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]]:
    """The entry's state-dict layout (name -> shape) and its optional prefixes, from a model on the meta device."""
    with torch.device("meta"):
        module = spec.build()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}, tuple(module.optional_tensors)


def strip_prefix(names: list[str], expected: set[str]) -> str:
    """The leading dotted prefix (up to three parts, e.g. "module.", "visual.") whose removal makes the most names
    match `expected`; "" when none helps. Ties go to the shortest."""
    candidates = {""}
    for key in names:
        parts = key.split(".")
        candidates.update(".".join(parts[:n]) + "." for n in range(1, min(4, len(parts))))

    def matches(prefix: str) -> int:
        return sum(1 for k in names if k.startswith(prefix) and k[len(prefix) :] in expected)

    return max(sorted(candidates, key=len), key=matches)


def check_layout(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    *,
    path: Path,
    what: str,
    optional: tuple[str, ...] = (),
) -> tuple[list[str], list[str]]:
    """Compare a file's tensors (prefix already stripped) with an architecture's.

    Raises CheckpointError, naming `path` and the first tensor that does not fit, when a shape differs or a
    required tensor is missing. Returns (missing optional tensors, unexpected tensors of the file).
    """
    for name, shape in expected.items():
        if name in found and found[name] != shape:
            raise CheckpointError(
                f"does not fit {what}: first tensor that does not fit is {name} {found[name]}, expected {shape}",
                path=path,
            )
    missing = [k for k in expected if k not in found]
    required = [k for k in missing if not k.startswith(optional)]
    if required:
        hint = next((k for k in found if k not in expected), None)
        raise CheckpointError(
            f"does not fit {what}: first tensor that does not fit is {required[0]}, which the file lacks "
            f"({len(required)} missing" + (f"; the file has e.g. {hint} instead" if hint else "") + ")",
            path=path,
        )
    return missing, [k for k in found if k not in expected]


def check_weights_file(spec: FoundationSpec, path: str | Path) -> Path:
    """Check that `path` (a file or checkpoint folder) holds `spec`'s weights; returns the weights file."""
    file = resolve_weights_path(path)
    if not file.is_file():
        raise CheckpointError("encoder weights file not found", path=file)
    expected, optional = expected_shapes(spec)
    shapes = read_shapes(file)
    prefix = strip_prefix(list(shapes), set(expected))
    found = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in shapes.items()}
    missing, unexpected = check_layout(
        expected, found, path=file, what=f"the {spec.name} encoder ({spec.architecture})", optional=optional
    )
    logger.info(
        "%s: %d tensors fit %s%s%s",
        file,
        len(expected) - len(missing),
        spec.name,
        f" (prefix {prefix!r} stripped)" if prefix else "",
        f"; {len(unexpected)} others ignored (e.g. {unexpected[0]})" if unexpected else "",
    )
    return file
