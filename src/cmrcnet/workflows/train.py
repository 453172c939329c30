"""Fit a model, then build its reference bank: the two steps of a complete run, composed through the run folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cmrcnet.atomic import write_json
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.stain import save_stain_reference, training_stain_reference
from cmrcnet.inference.bank import build_bank, save_bank
from cmrcnet.inference.confidence_reference import write_confidence_reference
from cmrcnet.inference.kchoice import update_run_k
from cmrcnet.run.config import RunConfig
from cmrcnet.run.layout import RUN_FILE, STAIN_REFERENCE_FILE, one_run_dir
from cmrcnet.run.load import load_trained_model
from cmrcnet.training.distributed import barrier, dist_from_env, resolve_device
from cmrcnet.training.fit import fit_run
from cmrcnet.training.trainer import TrainResult

logger = logging.getLogger(__name__)


def train_run(
    *,
    data_dir: str | Path,
    train_samples: list[str],
    config: RunConfig,
    run_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    out_dir: str | Path | None = None,
    **fit_options: Any,
) -> TrainResult:
    """Fit a model, then embed the training samples' expression into its reference bank.

    With the bank, the retrieval k is chosen when the config says ``retrieval.k: auto`` (the default;
    `cmrcnet.inference.kchoice`, RUN_DIR/retrieval_k.json), then the retrieval similarity of the run's validation
    spots is measured and written to
    confidence_reference.json (`cmrcnet.inference.confidence_reference`). Under torchrun the first process builds the bank; all wait for it. The bank is not built for the regression
    method. run.json ends with status "complete".

    Parameters
    ----------
    data_dir
        A prepared dataset folder.
    train_samples
        The samples to train on and to put in the bank.
    config
        The run's configuration.
    run_dir
        The run folder to write.
    device
        "cpu", "cuda", "cuda:N" or "auto".
    progress
        Show progress bars.
    out_dir
        Former name of `run_dir`: deprecated (DeprecationWarning), still accepted.
    **fit_options
        `resume`, `all_samples_for_paper_genes` and `command`, passed to `cmrcnet.training.fit.fit_run`.

    Returns
    -------
    TrainResult
        The run folder, the best epoch, its validation loss and the per-epoch history.
    """
    run_dir = one_run_dir(run_dir, out_dir, old_name="out_dir", func="train_run")
    result = fit_run(
        data_dir=data_dir,
        train_samples=train_samples,
        run_dir=run_dir,
        config=config,
        device=device,
        progress=progress,
        **fit_options,
    )
    info = dist_from_env()
    if info.is_main:
        save_stain_reference(  # before the confidence reference, which reads it for stain-normalised runs
            training_stain_reference(PreparedDataset(data_dir), list(dict.fromkeys(train_samples))),
            run_dir / STAIN_REFERENCE_FILE,
        )
        trained = load_trained_model(run_dir, device=resolve_device(device, info))
        if trained.model_config.method != "regression":
            samples = list(dict.fromkeys(train_samples))
            bank = build_bank(trained, PreparedDataset(data_dir), samples, progress=progress)
            save_bank(bank, run_dir)
            logger.info("reference bank: %d spots of %s (%s)", len(bank), samples, bank.fingerprint)
            update_run_k(trained, bank, PreparedDataset(data_dir), progress=progress, fallback=True)  # then the reference
            write_confidence_reference(trained, bank, data_dir, progress=progress)
        meta = json.loads((run_dir / RUN_FILE).read_text())
        meta["status"] = "complete"
        write_json(run_dir / RUN_FILE, meta)
    barrier()
    return result


__all__ = ["TrainResult", "train_run"]
