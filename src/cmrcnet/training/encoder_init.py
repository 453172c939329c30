"""Start a run's image encoder from `cmrcnet pretrain` output or a weights file (`RunConfig.encoder_weights`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from cmrcnet.errors import ConfigError
from cmrcnet.models.encoders import load_encoder_weights


def load_initial_encoder(model: nn.Module, source: str | Path) -> dict:
    """Load the encoder weights named by a run config's `encoder_weights` into `model.image_encoder`.

    `source` is a folder written by `cmrcnet pretrain` (its encoder.json must describe the same architecture and
    sizes; loaded strictly) or a weights file (.safetensors or torch state dict; loaded leniently, with missing
    and unexpected tensors reported). Returns a record for run.json.
    """
    from cmrcnet.training.pretrain import ENCODER_WEIGHTS, read_encoder_dir

    path = Path(source)
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
        report = load_encoder_weights(model.image_encoder, path / ENCODER_WEIGHTS, strict=True)
        record = {"source": "cmrcnet pretrain", "dir": str(path.resolve()), **report.to_dict()}
        record["pretraining"] = info.get("pretraining", {})
        record["transductive"] = bool(info.get("pretraining", {}).get("transductive", False))
        return record
    report = load_encoder_weights(model.image_encoder, path, strict=False)
    return {"source": "weights file", **report.to_dict(), "transductive": False}
