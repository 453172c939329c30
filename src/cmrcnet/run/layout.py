"""File names inside a RUN_DIR, defined once for the trainer, the bank and prediction, and the one name of the
run folder argument (`run_dir`)."""

from __future__ import annotations

import warnings
from pathlib import Path

from cmrcnet.errors import ConfigError

CONFIG_FILE = "config.yaml"  # resolved RunConfig
MODEL_FILE = "model.json"  # ModelConfig (also stored in every checkpoint)
GENES_FILE = "genes.json"  # the ordered gene list and how it was chosen
NORMALIZATION_FILE = "normalization.json"  # how expression was normalised
SPOTS_FILE = "spots.json"  # training and validation spot ids per sample
METRICS_FILE = "metrics.csv"  # one row per epoch
CURVE_FILE = "loss_curve.png"  # train/validation loss per epoch
RUN_FILE = "run.json"  # provenance and status
BEST_CKPT = "best.pt"  # lowest validation loss
LAST_CKPT = "last.pt"  # end of the latest finished epoch (resume point)
CHECKPOINTS = (BEST_CKPT, LAST_CKPT)  # the checkpoints a run can predict with
BANK_FILE = "bank.pt"  # reference bank for retrieval
STAIN_REFERENCE_FILE = "stain_reference.json"  # colour statistics of the training patches (data.stain)
CONFIDENCE_REFERENCE_FILE = "confidence_reference.json"  # retrieval similarity of the validation spots
K_CHOICE_FILE = "retrieval_k.json"  # the retrieval k chosen for the current bank (inference.kchoice)


def one_run_dir(run_dir: str | Path | None, old: str | Path | None, *, old_name: str, func: str) -> Path:
    """The run folder given as `run_dir`, or by its former keyword `old_name` (with a DeprecationWarning)."""
    if old is not None:
        warnings.warn(
            f"{func}({old_name}=...) is deprecated; pass run_dir=... instead", DeprecationWarning, stacklevel=3
        )
        if run_dir is not None and Path(run_dir) != Path(old):
            raise ConfigError(f"run_dir={str(run_dir)!r} and {old_name}={str(old)!r} differ; give run_dir= only")
        run_dir = old
    if run_dir is None:
        raise ConfigError(f"{func} needs the run folder: give run_dir=")
    return Path(run_dir)
