"""Run configuration: model preset + training + gene selection + retrieval, saved as YAML in every run.

`--config paper|cpu|tiny|FILE.yaml` picks a starting point; command-line flags override single fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cmrcnet.data.genes import GeneSelectionConfig
from cmrcnet.data.stain import DEFAULT_STAIN_RULE, STAIN_RULES
from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.models.config import ENCODER_PRESETS, ModelConfig
from cmrcnet.runtime import PRECISION_CHOICES


@dataclass
class TrainConfig:
    """Optimisation settings (METHOD.md step 7 for the paper's values)."""

    epochs: int = 60  # passes over the training spots
    batch_size: int = 64  # spots per optimiser step (summed over processes and accumulation steps)
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4  # peak AdamW learning rate
    min_lr: float = 1e-5  # cosine schedule floor
    weight_decay: float = 1e-3  # AdamW weight decay
    warmup_epochs: float = 0.0  # linear warm-up length in epochs (0: none, as in the paper's code)
    ema_decay: float = 0.99  # decay of the exponential moving average of the weights
    val_fraction: float = 0.2  # fraction of each training sample's spots held out for validation
    seed: int = 0  # seeds shuffling, augmentation, dropout, masking and the validation split
    # "auto" (measured per machine, runtime.resolve_precision), "fp32", "bf16" (CPU and CUDA) or "fp16" (CUDA)
    precision: str = "auto"
    augment_flips: bool = True  # random horizontal and vertical flips
    augment_rot90: bool = True  # random rotations by multiples of 90 degrees
    color_jitter: float = 0.0  # strength of random per-channel scale/shift in [0, 1] colour space (0: off)
    stain_jitter: float = 0.0  # strength of random per-channel optical-density scale/shift (0: off)
    scale_jitter: float = 1.0  # patches shrunk by up to this factor and resized back, as coarser scans (1: off)
    # map each training sample's patches onto the training samples' pooled colour statistics (slide level, by
    # `stain_rule`), as prediction maps a new slide's; the validation spots of the confidence reference get the
    # same mapping
    stain_normalise: bool = False
    # the rule of that mapping ("contrast" or "reinhard", cmrcnet.data.stain); recorded so that the run's k choice
    # and confidence reference map its training spots as training did (runs saved before this field existed
    # trained by Reinhard: `saved_run_config`)
    stain_rule: str = DEFAULT_STAIN_RULE
    max_grad_norm: float = 0.0  # gradient clipping norm (0: off)
    num_threads: int = 0  # CPU threads for torch (0: torch's default)
    select: str = "best"  # checkpoint used for prediction: "best" (lowest validation loss) or "last"
    use_ema: bool = False  # predict with the EMA weights instead of the raw weights
    feature_cache: str = (
        ""  # folder of the frozen-encoder feature cache ("": $CMRCNET_CACHE or ~/.cache/cmrcnet)
    )

    def validate(self) -> None:
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 2, f"batch_size must be >= 2 (contrastive loss), got {self.batch_size}")
        _require(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        _require(self.batch_size % self.grad_accum == 0, "batch_size must be a multiple of grad_accum")
        _require(self.lr > 0, f"learning rate must be positive, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr], got {self.min_lr}")
        _require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        _require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _require(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        _require(
            self.precision in PRECISION_CHOICES,
            f"precision must be one of {PRECISION_CHOICES}, got {self.precision!r}",
        )
        _require(self.color_jitter >= 0, f"color_jitter must be >= 0, got {self.color_jitter}")
        _require(0 <= self.stain_jitter < 1, f"stain_jitter must be in [0, 1), got {self.stain_jitter}")
        _require(self.scale_jitter >= 1, f"scale_jitter must be >= 1, got {self.scale_jitter}")
        _require(self.stain_rule in STAIN_RULES, f"stain_rule must be one of {STAIN_RULES}, got {self.stain_rule!r}")
        _require(self.select in ("best", "last"), f"select must be 'best' or 'last', got {self.select!r}")
        _require(self.num_threads >= 0, f"num_threads must be >= 0, got {self.num_threads}")


@dataclass
class RetrievalConfig:
    """Prediction by retrieval (METHOD.md step 8)."""

    # neighbours averaged per query: a number, or "auto" (default): chosen from 5-1600 by leave-one-training-
    # section-out whenever the bank is built or extended (cmrcnet.inference.kchoice; RUN_DIR/retrieval_k.json)
    k: int | str = "auto"
    weighting: str = "mean"  # "mean" (the paper) or "similarity" (similarity-weighted average)

    def validate(self) -> None:
        ok = self.k == "auto" or (isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1)
        _require(ok, f"retrieval k must be 'auto' or an integer >= 1, got {self.k!r}")
        _require(self.weighting in ("mean", "similarity"), f"unknown weighting {self.weighting!r}")


@dataclass
class RunConfig:
    """Everything a training run needs besides the data."""

    encoder: str = "cpu"  # ENCODER_PRESETS entry for the image encoder
    method: str = "cmrcnet"  # "cmrcnet", "bleep" or "regression"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig field overrides
    # initial encoder weights: a folder written by `cmrcnet pretrain`, or a .safetensors / torch state-dict file
    encoder_weights: str = ""
    train: TrainConfig = field(default_factory=TrainConfig)
    genes: GeneSelectionConfig = field(default_factory=GeneSelectionConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def validate(self) -> None:
        _require(self.encoder in ENCODER_PRESETS, f"unknown encoder preset {self.encoder!r}")
        self.model_config(n_genes=1)  # validates method and overrides
        self.train.validate()
        self.genes.validate()
        self.retrieval.validate()

    def model_config(self, *, n_genes: int) -> ModelConfig:
        fixed = sorted({"n_genes", "method", "encoder"} & set(self.model))
        if fixed:
            raise ConfigError(
                f"model overrides cannot set {fixed}: n_genes comes from the gene list, method and encoder "
                "are top-level config keys"
            )
        return ModelConfig.from_preset(self.encoder, n_genes=n_genes, method=self.method, **self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        return _build(cls, data, source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _run_presets() -> dict[str, RunConfig]:
    return {
        # the paper's recipe (METHOD.md step 7) with its ViT
        "paper": RunConfig(encoder="paper", train=TrainConfig(epochs=60, batch_size=64)),
        # small ViT measured to train an epoch over ~1,000 spots in well under a minute on 2 CPU cores; 60 epochs
        # (not 30): on held-out B4 and its degraded copy every seed scored better, level over the six held-out
        # sections (benchmarks/results/her2st_accuracy.md, cmrcnet-cpu60 against cmrcnet-cpu30); the 30-epoch runs
        # reached their lowest validation loss at epoch 29-30. The reconstruction term weighted 3x: on 224 um
        # patches HEG-50 over the six held-out sections +0.016 [+0.005, +0.027], markers level, the degraded copy
        # higher on both (cmrcnet-cpu60-ctx224-rw3 against cmrcnet-cpu60-ctx224); at weight 1 the term falls to
        # ~0.04 against ~1.5 for the contrastive term
        "cpu": RunConfig(encoder="cpu", model={"recon_weight": 3.0}, train=TrainConfig(epochs=60, batch_size=64)),
        # for tests and smoke runs only
        "tiny": RunConfig(encoder="tiny", train=TrainConfig(epochs=2, batch_size=8, precision="fp32")),
    }


RUN_PRESETS = tuple(_run_presets())


# the rule training-time stain normalisation used before runs recorded `train.stain_rule`
LEGACY_STAIN_RULE = "reinhard"


def saved_run_config(data: dict, source: str) -> RunConfig:
    """The config a run saved in its checkpoints, with `with_legacy_fields`."""
    return RunConfig.from_dict(with_legacy_fields(data), source=source)


def with_legacy_fields(data: dict) -> dict:
    """A run's saved config with the fields added since filled in as that run behaved: a run saved before
    `train.stain_rule` existed and trained stain-normalised did so by Reinhard's rule (`LEGACY_STAIN_RULE`);
    one that did not normalise gets today's default, which it never used."""
    train = data.get("train")
    if isinstance(train, dict) and "stain_rule" not in train:
        rule = LEGACY_STAIN_RULE if train.get("stain_normalise") else DEFAULT_STAIN_RULE
        return {**data, "train": {**train, "stain_rule": rule}}
    return data


def load_run_config(spec: str | Path, *, saved_run: bool = False) -> RunConfig:
    """A preset name ("paper", "cpu", "tiny") or a YAML file written by a previous run or by hand;
    `saved_run`: the file is a run's own config.yaml (fields added since are read as that run behaved,
    `saved_run_config`)."""
    presets = _run_presets()
    if str(spec) in presets:
        cfg = presets[str(spec)]
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputFileError(
                f"config is neither a preset ({', '.join(presets)}) nor an existing file", path=path
            )
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InputFileError(f"invalid YAML ({_yaml_problem(exc)})", path=path) from exc
        if not isinstance(data, dict):
            raise InputFileError("config must be a YAML mapping", path=path)
        preset = data.pop("preset", None)
        if preset is not None and (not isinstance(preset, str) or preset not in presets):
            raise ConfigError(f"{path}: unknown preset {preset!r}; choose one of {list(presets)}")
        base = presets[preset] if preset is not None else RunConfig()
        cfg = _build(RunConfig, _merge(base.to_dict(), with_legacy_fields(data) if saved_run else data), str(path))
        try:
            cfg.validate()
        except ConfigError as exc:  # name the file the bad value came from
            raise ConfigError(exc.problem, path=path) from exc
        return cfg
    cfg.validate()
    return cfg


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's multi-line message as "line L, column C: problem"."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is None or problem is None:
        return str(exc)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def _build(cls: type, data: Any, source: str) -> Any:
    """Instantiate a (nested) config dataclass from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown {cls.__name__} keys {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{source}.{key}")
        else:
            kwargs[key] = _coerce(value, hint, f"{source}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if hint is float and isinstance(value, str):
        # PyYAML reads exponents without a dot ("1e-4") as strings; accept any finite number written so
        with contextlib.suppress(ValueError):
            value = float(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    origin = typing.get_origin(hint)
    if origin is dict and isinstance(value, dict):
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(hint) or (object,)
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{where}: expected a list of {item.__name__}, got {value!r}")
        return list(value)
    if hint in (int, float, bool, str):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
