"""Fit a model on prepared samples and write the run folder (everything but the reference bank).

`fit_run` is a short sequence of named steps: open the data, find a run to resume, resolve the precision, choose
the genes, load and split the spots, write the run's files, then train. The bank is built by the caller
(`cmrcnet.workflows.train.train_run`): training never calls inference.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from cmrcnet.atomic import write_json
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.genes import GeneList, select_genes
from cmrcnet.data.splits import validation_spots
from cmrcnet.data.spots import SpotTable, load_spot_table
from cmrcnet.errors import ConfigError
from cmrcnet.run.checkpoint import load_checkpoint
from cmrcnet.run.config import RunConfig, load_run_config
from cmrcnet.run.encoder_source import encoder_fov_note
from cmrcnet.run.layout import CONFIG_FILE, GENES_FILE, LAST_CKPT, RUN_FILE
from cmrcnet.runtime import PrecisionChoice, resolve_precision
from cmrcnet.training.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    dist_from_env,
    init_distributed,
    resolve_device,
)
from cmrcnet.training.run_files import (
    common_fov,
    record_session,
    remove_stale_temporaries,
    write_run_files,
)
from cmrcnet.training.trainer import Trainer, TrainResult

logger = logging.getLogger(__name__)


def fit_run(
    *,
    data_dir: str | Path,
    train_samples: list[str],
    run_dir: str | Path,
    config: RunConfig,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    all_samples_for_paper_genes: list[str] | None = None,
    command: str | None = None,
) -> TrainResult:
    """Fit a model on `train_samples` of a prepared dataset and write the run folder.

    Parameters
    ----------
    data_dir
        A prepared dataset folder (`cmrcnet prepare`).
    train_samples
        The samples to train on (each needs an image); duplicates are dropped.
    run_dir
        The run folder to write: config, genes, checkpoints, metrics, run.json with status "trained".
    config
        The run's configuration. A resumed run uses the config saved in the folder.
    device
        "cpu", "cuda", "cuda:N" or "auto"; under torchrun each process takes its own GPU.
    resume
        Continue the run in `run_dir` from its last checkpoint. Without it, a folder that holds a run is an error.
    progress
        Show progress bars (on the first process).
    all_samples_for_paper_genes
        The samples whose genes the "paper" gene mode unites (default: every sample of the dataset).
    command
        The command line recorded in run.json.

    Returns
    -------
    TrainResult
        The run folder, the best epoch (0-based), its validation loss and the per-epoch history.
    """
    info = dist_from_env()
    dev = resolve_device(device, info)
    init_distributed(info, dev)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    run_dir = Path(run_dir)
    dataset, train_samples = _open_training_samples(data_dir, train_samples)
    ckpt, config = _resume_state(run_dir, config, resume=resume, is_main=info.is_main)
    config.validate()
    # rank 0 measures and decides, so every process computes in the same precision
    choice = resolve_precision(config.train.precision, dev, training=True) if info.is_main else None
    choice = broadcast_object(choice, info)
    fov_um = common_fov(dataset, train_samples)  # checked on every process, so a mismatch stops them all
    gene_list = _choose_genes(
        run_dir,
        dataset,
        train_samples,
        config,
        info,
        resumed=ckpt is not None,
        paper=all_samples_for_paper_genes,
    )
    mcfg = config.model_config(n_genes=len(gene_list.genes))
    table = load_spot_table(
        dataset,
        train_samples,
        gene_list.genes,
        img_size=mcfg.img_size,
        target_sum=config.genes.target_sum,
        progress=progress and info.is_main,
    )
    if config.train.stain_normalise:
        _normalise_training_stain(dataset, train_samples, table, config.train.stain_rule)
    train_set, val_set = _split_validation(table, config)
    if info.is_main and ckpt is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_files(
            run_dir,
            config=config,
            mcfg=mcfg,
            gene_list=gene_list,
            dataset=dataset,
            train_samples=train_samples,
            train_set=train_set,
            val_set=val_set,
            fov_um=fov_um,
            command=command,
        )
    trainer = Trainer(
        run_dir=run_dir,
        config=config,
        model_config=mcfg,
        train=train_set,
        val=val_set,
        device=dev,
        dist_info=info,
        progress=progress,
        precision=choice.precision,
        encoder_ref=(ckpt or {}).get("encoder_ref"),  # a resumed run's frozen encoder, stored by reference
    )
    _start_trainer(trainer, ckpt, choice, info)
    note = encoder_fov_note(trainer.encoder_init, fov_um)
    if note and info.is_main:
        logger.warning(note)
    logger.info(
        "training %s on %d spots (%d validation) from %s, %d genes, %d process(es), device %s",
        mcfg.method,
        len(train_set),
        len(val_set),
        train_samples,
        len(gene_list.genes),
        info.world_size,
        dev,
    )
    result = trainer.fit()
    if info.is_main:
        _mark_trained(run_dir, result)
    barrier()
    return result


def _open_training_samples(
    data_dir: str | Path, train_samples: list[str]
) -> tuple[PreparedDataset, list[str]]:
    """The dataset and the training samples without duplicates; every one must exist and have an image."""
    dataset = PreparedDataset(data_dir)
    train_samples = list(dict.fromkeys(train_samples))
    dataset.require(train_samples)
    no_image = [s for s in train_samples if not dataset.has_image(s)]
    if no_image:
        raise ConfigError(
            f"training samples need images; {no_image} are expression-only (use them in `bank add`)"
        )
    return dataset, train_samples


def _resume_state(
    run_dir: Path, config: RunConfig, *, resume: bool, is_main: bool
) -> tuple[dict | None, RunConfig]:
    """(the last checkpoint to resume from or None, the config to use: the saved one when resuming)."""
    if not (run_dir / CONFIG_FILE).exists():
        return None, config
    if not resume:
        raise ConfigError(
            "already holds a run; pass resume=True to continue it, or choose another run_dir=", path=run_dir
        )
    if is_main:
        remove_stale_temporaries(run_dir)
    if not (run_dir / LAST_CKPT).exists():
        return None, config
    ckpt = load_checkpoint(run_dir / LAST_CKPT)
    saved = load_run_config(run_dir / CONFIG_FILE, saved_run=True)
    if saved.to_dict() != config.to_dict():
        logger.warning("resume=True: using the run's saved config.yaml, not the one given now")
    return ckpt, saved


def _choose_genes(
    run_dir: Path,
    dataset: PreparedDataset,
    train_samples: list[str],
    config: RunConfig,
    info: DistInfo,
    *,
    resumed: bool,
    paper: list[str] | None,
) -> GeneList:
    """The run's genes: those saved by a resumed run, else chosen on the first process from the training samples
    only (strict) or the paper's union over all samples, and shared with every process."""
    if resumed:
        gene_list = GeneList.from_dict(json.loads((run_dir / GENES_FILE).read_text()))
    elif info.is_main:
        counts = {s: dataset.read_counts(s) for s in train_samples}
        everything = None
        if config.genes.mode == "paper":
            ids = paper or dataset.sample_ids()
            everything = {s: dataset.read_counts(s) for s in ids}
        gene_list = select_genes(counts, config=config.genes, all_samples=everything)
    else:
        gene_list = None
    return broadcast_object(gene_list, info)


def _normalise_training_stain(dataset, train_samples: list[str], table: SpotTable, rule: str) -> None:
    """Map every training sample's patches onto the samples' pooled colour statistics (the run's stain
    reference, `training_stain_reference`) by `rule`, so the model trains on colours as `predict` will give it."""
    from cmrcnet.data.stain import normalise_table, training_stain_reference

    target = training_stain_reference(dataset, list(dict.fromkeys(train_samples)))
    for sid, line in normalise_table(table, target, rule=rule).items():
        logger.info("%s: training patches colour-normalised to the training samples' pooled statistics (%s)",
                    sid, line)


def _split_validation(table: SpotTable, config: RunConfig) -> tuple[SpotTable, SpotTable]:
    """(training spots, validation spots): `val_fraction` of each sample's spots held out, seeded."""
    spots_by_sample: dict[str, list[str]] = {}
    for sid, bc in zip(table.sample_ids, table.barcodes, strict=True):
        spots_by_sample.setdefault(sid, []).append(bc)
    val_ids = validation_spots(spots_by_sample, fraction=config.train.val_fraction, seed=config.train.seed)
    val_keys = {f"{s}:{b}" for s, bcs in val_ids.items() for b in bcs}
    is_val = np.array([k in val_keys for k in table.keys()])
    train_set, val_set = table.subset(np.flatnonzero(~is_val)), table.subset(np.flatnonzero(is_val))
    if len(train_set) < 2:
        raise ConfigError(f"only {len(train_set)} training spots after the validation split")
    return train_set, val_set


def _start_trainer(trainer: Trainer, ckpt: dict | None, choice: PrecisionChoice, info: DistInfo) -> None:
    """Frozen features and handcrafted standardisation, the resumed state, and this session in run.json."""
    trainer.prepare_features(fit_handcrafted=ckpt is None)
    if ckpt is not None:
        trainer.load_state(ckpt)
        logger.info("resuming %s after epoch %d", trainer.run_dir, trainer.start_epoch)
    if info.is_main:
        record_session(
            trainer.run_dir,
            choice,
            resumed=ckpt is not None,
            encoder_init=trainer.encoder_init,
            feature_cache=trainer.feature_cache_summary,
            encoder_ref=trainer.encoder_ref,
        )


def _mark_trained(run_dir: Path, result: TrainResult) -> None:
    """run.json: status "trained", with the best epoch (1-based) and its validation loss."""
    meta = json.loads((run_dir / RUN_FILE).read_text())
    meta.update(status="trained", best_epoch=result.best_epoch + 1, best_val_loss=result.best_val_loss)
    write_json(run_dir / RUN_FILE, meta)
