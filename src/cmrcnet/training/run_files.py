"""The files a training run writes besides its checkpoints: config, genes, spots, run.json, metrics.csv."""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
import sys
from pathlib import Path

import torch

from cmrcnet import __version__
from cmrcnet.atomic import write_json, write_text
from cmrcnet.data.dataset import PreparedDataset, same_fov
from cmrcnet.data.genes import GeneList
from cmrcnet.data.spots import SpotTable
from cmrcnet.errors import ConfigError
from cmrcnet.models.config import ModelConfig
from cmrcnet.run.config import RunConfig
from cmrcnet.run.layout import (
    BANK_FILE,
    BEST_CKPT,
    CONFIG_FILE,
    CURVE_FILE,
    GENES_FILE,
    LAST_CKPT,
    METRICS_FILE,
    MODEL_FILE,
    NORMALIZATION_FILE,
    RUN_FILE,
    SPOTS_FILE,
)
from cmrcnet.runtime import PrecisionChoice

logger = logging.getLogger(__name__)


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())


def record_session(
    run_dir: Path,
    choice: PrecisionChoice,
    *,
    resumed: bool,
    encoder_init: dict | None,
    feature_cache: dict | None,
    encoder_ref: dict | None = None,
) -> None:
    """run.json: the precision this session computes in, how checkpoints store the encoder (`encoder_storage`:
    "inline", or "reference" with the weights file's path and SHA-256), and for a fresh run the encoder's origin
    and the feature cache. A resumed run whose precision changed keeps the earlier choices in
    `precision_history`."""
    meta = json.loads((run_dir / RUN_FILE).read_text())
    before = meta.get("precision")
    if resumed and before and before.get("precision") != choice.precision:
        logger.warning(
            "resuming in %s; the run's earlier epochs ran in %s", choice.precision, before.get("precision")
        )
        meta.setdefault("precision_history", []).append(before)
    meta["precision"] = choice.to_dict()
    meta["encoder_storage"] = {"stored": "inline"}
    if encoder_ref is not None:
        meta["encoder_storage"] = {
            "stored": "reference",
            "path": encoder_ref["file"],
            "sha256": encoder_ref["sha256"],
            "n_tensors": len(encoder_ref["tensors"]),
        }
    if not resumed:
        meta["encoder_init"] = encoder_init
        meta["transductive"] = bool((encoder_init or {}).get("transductive", False))
        meta["feature_cache"] = feature_cache
    write_json(run_dir / RUN_FILE, meta)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the hidden temporary siblings ('.NAME.*.tmp*', see cmrcnet.atomic) that a killed run left."""
    names = (CONFIG_FILE, MODEL_FILE, GENES_FILE, NORMALIZATION_FILE, SPOTS_FILE, METRICS_FILE, CURVE_FILE)
    names += (RUN_FILE, BEST_CKPT, LAST_CKPT, BANK_FILE)
    stale = [p for name in names for p in run_dir.glob(f".{name}.*.tmp*") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s", len(stale), run_dir)
    return stale


def common_fov(dataset: PreparedDataset, samples: list[str]) -> float:
    """The field of view (um) shared by all samples' patches; different fields of view are an error."""
    fovs = {s: float(dataset.metadata(s)["fov_um"]) for s in samples}
    first = fovs[samples[0]]
    if not all(same_fov(first, fov) for fov in fovs.values()):
        raise ConfigError(
            "training samples were prepared with different fields of view ("
            + ", ".join(f"{s}: {fov:g} um" for s, fov in fovs.items())
            + "); prepare them again with one fov_um="
        )
    return first


def write_run_files(
    run_dir: Path,
    *,
    config: RunConfig,
    mcfg: ModelConfig,
    gene_list: GeneList,
    dataset: PreparedDataset,
    train_samples: list[str],
    train_set: SpotTable,
    val_set: SpotTable,
    fov_um: float,
    command: str | None,
) -> None:
    """Everything about a run except weights and metrics, written before the first epoch. `fov_um`: the training
    patches' field of view, as `common_fov` checked it."""
    metas = {s: dataset.metadata(s) for s in train_samples}
    sizes = {int(m["patch_px"]) for m in metas.values()}
    write_text(run_dir / CONFIG_FILE, config.to_yaml())
    write_json(run_dir / MODEL_FILE, mcfg.to_dict())
    write_json(run_dir / GENES_FILE, gene_list.to_dict())
    write_json(
        run_dir / NORMALIZATION_FILE,
        {
            "method": "library-size normalisation to target_sum, then log1p (natural log)",
            "target_sum": config.genes.target_sum,
            "library_size": "total counts of the spot over all measured genes",
        },
    )
    spots: dict[str, dict[str, list[str]]] = {"train": {}, "validation": {}}
    for part, table in (("train", train_set), ("validation", val_set)):
        for sid, bc in zip(table.sample_ids, table.barcodes, strict=True):
            spots[part].setdefault(sid, []).append(bc)
    write_json(run_dir / SPOTS_FILE, spots)
    write_json(
        run_dir / RUN_FILE,
        {
            "status": "training",
            "cmrcnet_version": __version__,
            "torch_version": torch.__version__,
            "python": sys.version.split()[0],
            "machine": platform.platform(),
            "command": command,
            "data_dir": str(dataset.root.resolve()),
            "train_samples": train_samples,
            "patients": {s: m.get("patient") for s, m in metas.items()},
            "fov_um": fov_um,
            "patch_px": sorted(sizes),
            "pixel_size_um": {s: m.get("pixel_size_um") for s, m in metas.items()},
            "synthetic": any(m.get("synthetic") for m in metas.values()),
            "gene_mode": gene_list.mode,
            "n_genes": len(gene_list.genes),
            "n_train_spots": len(train_set),
            "n_val_spots": len(val_set),
        },
    )
