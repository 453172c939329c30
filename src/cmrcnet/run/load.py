"""Load a trained run (weights + config + genes) for prediction, without the training loop."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cmrcnet.data.genes import GeneList
from cmrcnet.errors import CheckpointError, ConfigError, InputFileError, require_dir
from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.model import CMRCNet
from cmrcnet.run.checkpoint import load_checkpoint
from cmrcnet.run.config import RunConfig, saved_run_config
from cmrcnet.run.encoder_source import load_initial_encoder, with_encoder
from cmrcnet.run.layout import BEST_CKPT, CONFIG_FILE, GENES_FILE, LAST_CKPT, MODEL_FILE, RUN_FILE

logger = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A model ready for inference, with everything needed to interpret its outputs."""

    model: CMRCNet
    model_config: ModelConfig
    run_config: RunConfig
    genes: list[str]
    gene_mode: str
    run_dir: Path
    checkpoint: str  # file name of the checkpoint used
    weights: str  # "model" or "ema"
    epoch: int  # 1-based epoch of the checkpoint
    run_info: dict

    @property
    def fingerprint(self) -> str:
        """Identifies the exact weights, so banks built from other weights are detected."""
        return f"{self.checkpoint}:{self.weights}:epoch{self.epoch}"


def load_trained_model(
    run_dir: str | Path,
    *,
    checkpoint: str | None = None,
    use_ema: bool | None = None,
    device: torch.device | str = "cpu",
) -> TrainedModel:
    """Load the run's selected checkpoint in eval mode on `device`: by default the one its config.yaml's
    `train.select` names (best/last), with the EMA weights when its `train.use_ema` is true.

    A checkpoint that stores its frozen encoder by reference (`encoder_ref`) gets it from the recorded weights file,
    loaded as at the start of training; a missing file or another SHA-256 raises InputFileError.
    """
    run_dir = require_dir(run_dir, "run folder")
    ckpt_path_cfg = run_dir / CONFIG_FILE
    if not ckpt_path_cfg.is_file():
        raise InputFileError(
            "not a cmrcnet run folder (no config.yaml); train one with `cmrcnet train`", path=run_dir
        )
    # the run's config.yaml decides what the arguments leave open (edited after training or not)
    choice = saved_train_choice(run_dir) if checkpoint is None or use_ema is None else {}
    data = load_checkpoint_for_run(run_dir, checkpoint, select=choice.get("select"))
    ckpt_path = run_dir / data["_file"]
    if use_ema is None:
        use_ema = choice.get("use_ema")
        if use_ema is not None and not isinstance(use_ema, bool):
            raise InputFileError(f"train.use_ema must be true or false, got {use_ema!r}", path=ckpt_path_cfg)
    try:
        mcfg = ModelConfig.from_dict(dict(data["model_config"]))
        rcfg = saved_run_config(dict(data["run_config"]), source=str(ckpt_path))
        ema = rcfg.train.use_ema if use_ema is None else use_ema
        state = data["ema"] if ema else data["model"]
        epoch = int(data["epoch"])
    except KeyError as exc:
        raise CheckpointError(f"checkpoint lacks {exc}", path=ckpt_path) from exc
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint holds an invalid config ({exc})", path=ckpt_path) from exc
    if ema:
        warn_if_young_ema(ckpt_path, data.get("step"), rcfg.train.ema_decay)
    _check_same_model(mcfg, run_dir / MODEL_FILE, ckpt_path)
    model = build_model(mcfg)
    ref = data.get("encoder_ref")
    if ref:  # a frozen encoder stored by reference: rebuilt from its weights file as training loaded it
        if not isinstance(ref, dict) or not {"weights", "sha256", "tensors"} <= set(ref):
            raise CheckpointError("checkpoint holds an invalid encoder reference", path=ckpt_path)
        load_initial_encoder(model, ref["weights"], sha256=ref["sha256"])
        state = with_encoder(state, ref, model)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"weights do not fit the stored model config ({exc})", path=ckpt_path) from exc
    model.to(device).eval()
    genes_path = run_dir / GENES_FILE
    try:
        gl = GeneList.from_dict(json.loads(genes_path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise InputFileError(f"cannot read the run's gene list ({exc})", path=genes_path) from exc
    if len(gl.genes) != mcfg.n_genes:
        raise CheckpointError(
            f"gene list has {len(gl.genes)} genes but the model {mcfg.n_genes}", path=genes_path
        )
    info_path = run_dir / RUN_FILE
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    return TrainedModel(
        model,
        mcfg,
        rcfg,
        gl.genes,
        gl.mode,
        run_dir,
        data["_file"],
        "ema" if ema else "model",
        epoch + 1,
        info,
    )


# the share of the initial weights an EMA may still hold before its weights are called close to an untrained model
YOUNG_EMA_SHARE = 0.05


def warn_if_young_ema(ckpt_path: Path, step: int | None, decay: float) -> None:
    """A log warning when the EMA weights of a checkpoint saved after `step` optimiser steps still hold more than
    `YOUNG_EMA_SHARE` of the initial weights (decay ** step): few steps (a small training set, an early best
    epoch) leave them close to the untrained model, which predicts nearly constant expression."""
    if step is None:
        return
    share = decay ** int(step)
    if share > YOUNG_EMA_SHARE:
        logger.warning(
            "%s: its EMA weights still hold %.0f %% of the initial weights (%d optimiser steps at decay %g), so "
            "they are close to an untrained model; predict with the raw weights (train.use_ema: false) "
            "or train with a lower train.ema_decay",
            ckpt_path,
            100 * share,
            int(step),
            decay,
        )


def _check_same_model(mcfg: ModelConfig, model_json: Path, ckpt_path: Path) -> None:
    """A checkpoint copied in from another run (another model size, method or gene count) is refused."""
    if not model_json.is_file():  # runs written before model.json existed
        return
    try:
        saved = ModelConfig.from_dict(json.loads(model_json.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, ConfigError, TypeError) as exc:
        raise InputFileError(f"cannot read the run's model config ({exc})", path=model_json) from exc
    if saved != mcfg:
        differ = [
            f"{k}={getattr(mcfg, k)!r} (model.json: {getattr(saved, k)!r})"
            for k in mcfg.to_dict()
            if getattr(mcfg, k) != getattr(saved, k)
        ]
        raise CheckpointError(
            f"checkpoint does not match the run's model.json ({', '.join(differ[:4])}); was it copied from "
            "another run?",
            path=ckpt_path,
        )


def saved_train_choice(run_dir: Path) -> dict:
    """The `train` section of the run's config.yaml: it decides which saved weights predict (`select`, `use_ema`),
    so editing it after training changes them, as the same fields given before training would have."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputFileError("cannot read the run's config", path=run_dir / CONFIG_FILE) from exc
    train = saved.get("train") if isinstance(saved, dict) else None
    return train if isinstance(train, dict) else {}


def load_checkpoint_for_run(run_dir: Path, checkpoint: str | None, *, select: str | None = None) -> dict:
    """The checkpoint named, else the one `select` (the run config's `train.select`) names: best, falling back
    to last."""
    if checkpoint is None:
        checkpoint = LAST_CKPT if select == "last" else BEST_CKPT
        if not (run_dir / checkpoint).exists() and (run_dir / LAST_CKPT).exists():
            checkpoint = LAST_CKPT
    data = load_checkpoint(run_dir / checkpoint)
    data["_file"] = checkpoint
    return data
