"""Where a run's image encoder starts from (`RunConfig.encoder_weights`), and frozen encoders kept out of checkpoints.

`encoder_weights` names a folder written by `cmrcnet pretrain` (encoder.json + encoder.safetensors) or a weights
file. `load_initial_encoder` loads it at the start of training, and again whenever a checkpoint that stores its
encoder by reference is loaded (prediction, bank, resume): one code path, so the rebuilt encoder is the one
training used.

A frozen encoder loaded from a file never changes during the run, so its checkpoints omit the tensors the file
supplied (model and EMA state: 2 x 4.5 GB per file for a ViT-g) and record instead the file's path and SHA-256
(`encoder_reference`). Encoder tensors the file lacked (kept at their random initial values) stay in the
checkpoint. Checkpoints without a reference hold the whole encoder and load as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cmrcnet.data.dataset import same_fov
from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.encoders import file_sha256, load_encoder_weights
from cmrcnet.run.config import RunConfig

ENCODER_WEIGHTS = "encoder.safetensors"  # the weights of a `cmrcnet pretrain` folder
ENCODER_JSON = "encoder.json"  # its description (architecture, recipe); written last
ENCODER_FORMAT = "cmrcnet-encoder"
PREFIX = "image_encoder."  # the encoder's tensors in a model state dict


def read_encoder_dir(path: str | Path) -> dict:
    """encoder.json of a folder written by `pretrain_encoder`, checked for completeness."""
    path = Path(path)
    meta = path / ENCODER_JSON
    if not meta.is_file():
        raise InputFileError(f"is not a pretrained encoder folder (no {ENCODER_JSON})", path=path)
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"invalid JSON ({exc})", path=meta) from exc
    if (
        not isinstance(info, dict)
        or info.get("format") != ENCODER_FORMAT
        or not isinstance(info.get("model"), dict)
    ):
        raise InputFileError(f"is not a {ENCODER_FORMAT} description", path=meta)
    if not (path / ENCODER_WEIGHTS).is_file():
        raise InputFileError(f"lacks {ENCODER_WEIGHTS}", path=path)
    return info


def _check_recorded_file(source: Path, sha256: str) -> None:
    """The weights file a checkpoint refers to must exist and have the SHA-256 recorded at training time."""
    file = source / ENCODER_WEIGHTS if source.is_dir() else source
    if not file.is_file():
        raise InputFileError(
            "encoder weights not found; this run's checkpoints store their frozen encoder by reference "
            f"(sha256 {sha256[:12]}...), so the file must stay where training read it",
            path=file,
        )
    found = file_sha256(file)
    if found != sha256:
        raise InputFileError(
            f"encoder weights changed since training (sha256 {found[:12]}..., the run recorded {sha256[:12]}...); "
            "this run's checkpoints store their frozen encoder by reference and need the file it was trained with",
            path=file,
        )


def load_initial_encoder(model: nn.Module, source: str | Path, *, sha256: str | None = None) -> dict:
    """Load the encoder weights named by a run config's `encoder_weights` into `model.image_encoder`.

    Parameters
    ----------
    model
        A freshly built model; its `image_encoder` is overwritten.
    source
        A folder written by `cmrcnet pretrain` (its encoder.json must describe the same architecture and sizes;
        loaded strictly) or a weights file (.safetensors or torch state dict; loaded leniently, with missing and
        unexpected tensors reported).
    sha256
        The SHA-256 the weights file must have (a checkpoint's reference): checked before anything is loaded.

    Returns
    -------
    dict
        A record for run.json: source, path, sha256, tensors loaded, missing, unexpected, transductive.

    Raises
    ------
    InputFileError
        With `sha256`: the file is missing or its hash differs.
    """
    path = Path(source)
    if sha256 is not None:
        _check_recorded_file(path, sha256)
    if path.is_dir():
        info = read_encoder_dir(path)
        arch = info["model"]
        mcfg = model.config
        differ = [k for k, v in arch.items() if getattr(mcfg, k, None) != v]
        if differ:
            raise ConfigError(
                "the pretrained encoder does not match this run's model: "
                + ", ".join(f"{k}={arch[k]} vs {getattr(mcfg, k, None)}" for k in differ),
                path=path,
            )
        report = load_encoder_weights(model.image_encoder, path / ENCODER_WEIGHTS, strict=True, sha256=sha256)
        record = {"source": "cmrcnet pretrain", "dir": str(path.resolve()), **report.to_dict()}
        record["pretraining"] = info.get("pretraining", {})
        record["fov_um"] = info.get("fov_um")
        record["transductive"] = bool(info.get("pretraining", {}).get("transductive", False))
        return record
    report = load_encoder_weights(model.image_encoder, path, strict=False, sha256=sha256)
    return {"source": "weights file", **report.to_dict(), "transductive": False}


def encoder_fov_note(encoder_init: dict | None, fov_um: float) -> str | None:
    """A warning when a `cmrcnet pretrain` encoder was pretrained on tiles of another field of view than the
    training patches (it learned the tissue at another scale); None when they agree or nothing is recorded."""
    pretrained = (encoder_init or {}).get("fov_um")
    if pretrained is None or same_fov(pretrained, fov_um):
        return None
    return (
        f"the image encoder was pretrained on {float(pretrained):g} um tiles but the training patches are "
        f"{float(fov_um):g} um; for tissue at the same scale pretrain it again with fov_um={float(fov_um):g}"
    )


def stores_encoder_by_reference(mcfg: ModelConfig, rcfg: RunConfig) -> bool:
    """Whether the run's checkpoints omit the encoder: it is frozen and its weights come from a file."""
    return bool(mcfg.freeze_encoder and rcfg.encoder_weights)


def encoder_reference(model: nn.Module, encoder_init: dict, source: str | Path) -> dict:
    """What a checkpoint records instead of the frozen encoder's tensors (plain data).

    Parameters
    ----------
    model
        The model whose encoder `load_initial_encoder` has just loaded.
    encoder_init
        The record `load_initial_encoder` returned.
    source
        The run config's `encoder_weights` (a file, or a `cmrcnet pretrain` folder).

    Returns
    -------
    dict
        source ("weights file" / "cmrcnet pretrain"), weights (the absolute path `load_initial_encoder` is given
        again), file (the weights file) and sha256, and tensors: the state-dict names the file supplied.
    """
    missing = set(encoder_init.get("missing", []))
    return {
        "source": encoder_init["source"],
        "weights": str(Path(source).resolve()),
        "file": str(Path(encoder_init["path"]).resolve()),
        "sha256": encoder_init["sha256"],
        "tensors": [PREFIX + k for k in model.image_encoder.state_dict() if k not in missing],
    }


def without_encoder(state: dict[str, torch.Tensor], reference: dict) -> dict[str, torch.Tensor]:
    """A model (or EMA) state dict without the tensors the reference's weights file supplies."""
    omitted = set(reference["tensors"])
    return {k: v for k, v in state.items() if k not in omitted}


def with_encoder(
    state: dict[str, torch.Tensor], reference: dict, model: nn.Module
) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict completed with the referenced tensors of `model`, whose encoder was rebuilt
    from the weights file by `load_initial_encoder`."""
    own = model.state_dict()
    return {**state, **{k: own[k] for k in reference["tensors"]}}
