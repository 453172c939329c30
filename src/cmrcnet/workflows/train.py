"""Fit a model, then build its reference bank: the two steps of a complete run, composed through the run folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cmrcnet.atomic import write_json
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.inference.bank import build_bank, save_bank
from cmrcnet.run.config import RunConfig
from cmrcnet.run.layout import RUN_FILE
from cmrcnet.run.load import load_trained_model
from cmrcnet.training.distributed import barrier, dist_from_env, resolve_device
from cmrcnet.training.fit import fit_run
from cmrcnet.training.trainer import TrainResult

logger = logging.getLogger(__name__)


def train_run(
    *,
    data_dir: str | Path,
    train_samples: list[str],
    out_dir: str | Path,
    config: RunConfig,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    all_samples_for_paper_genes: list[str] | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train on `train_samples` (`cmrcnet.training.fit.fit_run`, every argument as there), then embed the
    training samples' expression into the reference bank (`cmrcnet.inference.bank`, not for the regression
    method) and mark run.json "complete". Under torchrun the first process builds the bank; all wait for it."""
    result = fit_run(
        data_dir=data_dir,
        train_samples=train_samples,
        run_dir=out_dir,
        config=config,
        device=device,
        resume=resume,
        progress=progress,
        all_samples_for_paper_genes=all_samples_for_paper_genes,
        command=command,
    )
    info = dist_from_env()
    run_dir = Path(out_dir)
    if info.is_main:
        trained = load_trained_model(run_dir, device=resolve_device(device, info))
        if trained.model_config.method != "regression":
            samples = list(dict.fromkeys(train_samples))
            bank = build_bank(trained, PreparedDataset(data_dir), samples, progress=progress)
            save_bank(bank, run_dir)
            logger.info("reference bank: %d spots of %s (%s)", len(bank), samples, bank.fingerprint)
        meta = json.loads((run_dir / RUN_FILE).read_text())
        meta["status"] = "complete"
        write_json(run_dir / RUN_FILE, meta)
    barrier()
    return result


__all__ = ["TrainResult", "train_run"]
