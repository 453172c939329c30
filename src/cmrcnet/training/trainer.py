"""Training loop: AdamW + cosine schedule, EMA, mixed precision, validation on held-out training spots,
atomic checkpoints every epoch, exact resume, and DistributedDataParallel under torchrun.

Determinism: shuffling and augmentation use generators seeded from (seed, epoch[, rank]) and the global torch
RNG (dropout, masking) is re-seeded at the start of every epoch, so a run resumed from `last.pt` continues
exactly like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cmrcnet import __version__
from cmrcnet.atomic import write_json, write_text
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.genes import GeneList, select_genes
from cmrcnet.data.splits import validation_spots
from cmrcnet.data.spots import SpotTable, load_spot_table
from cmrcnet.errors import CheckpointError, ConfigError
from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.encoders import load_encoder_weights
from cmrcnet.models.handcrafted import patch_features
from cmrcnet.plotting.curves import plot_loss_curve
from cmrcnet.run.checkpoint import load_checkpoint, save_checkpoint
from cmrcnet.run.config import RunConfig, load_run_config
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
from cmrcnet.runtime import PrecisionChoice, autocast_context, resolve_precision
from cmrcnet.training.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    dist_from_env,
    gather_with_grad,
    init_distributed,
    resolve_device,
)
from cmrcnet.training.feature_cache import FrozenFeatures, dihedral_variants, frozen_features
from cmrcnet.training.spots import augment

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)


def lr_at(step: int, *, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `total` steps."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(
    n: int, batch: int, generator: torch.Generator, *, shuffle: bool, multiple: int = 1
) -> list[torch.Tensor]:
    """Index batches of equal size `batch` (the incomplete tail is dropped), or one batch of all n when n < batch,
    cut to a multiple of `multiple` so every process gets an equal share (the embedding gather needs it)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if n <= batch:
        return [order[: n - n % multiple]]
    return [order[i : i + batch] for i in range(0, n - batch + 1, batch)]


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].lerp_(v.detach().float(), 1.0 - self.decay)
            else:
                self.state[k].copy_(v)


class Trainer:
    """Trains one run; see `train_run` for the usual entry point."""

    def __init__(
        self,
        *,
        run_dir: Path,
        config: RunConfig,
        model_config: ModelConfig,
        train: SpotTable,
        val: SpotTable,
        device: torch.device,
        dist_info: DistInfo,
        progress: bool,
        precision: str | None = None,
    ) -> None:
        """`precision`: the resolved precision to compute in (default: `config.train.precision` resolved here)."""
        self.run_dir = run_dir
        self.cfg = config
        self.tcfg = config.train
        self.mcfg = model_config
        self.train_set = train
        self.val_set = val
        self.device = device
        self.dist = dist_info
        self.precision = (
            precision or resolve_precision(config.train.precision, device, training=True).precision
        )
        self.progress = progress and dist_info.is_main
        torch.manual_seed(self.tcfg.seed)  # identical initial weights on every process
        self.model = build_model(model_config)
        self.encoder_init: dict | None = None
        if config.encoder_weights:
            self.encoder_init = load_initial_encoder(self.model, config.encoder_weights)
        self.model.to(device)
        self.frozen_train: FrozenFeatures | None = None
        self.frozen_val: FrozenFeatures | None = None
        self.feature_cache_summary: dict | None = None
        self.ema = EMA(self.model, self.tcfg.ema_decay)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=self.tcfg.lr,
            weight_decay=self.tcfg.weight_decay,
        )
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        per_step = self.tcfg.batch_size
        if dist_info.enabled and per_step % (dist_info.world_size * self.tcfg.grad_accum):
            raise ConfigError(
                f"batch_size {per_step} must be divisible by processes x grad_accum "
                f"({dist_info.world_size} x {self.tcfg.grad_accum})"
            )
        self.steps_per_epoch = max(1, len(train) // per_step) if len(train) >= per_step else 1
        self.total_steps = self.steps_per_epoch * self.tcfg.epochs
        self.warmup_steps = round(self.tcfg.warmup_epochs * self.steps_per_epoch)
        self.ddp: nn.Module = self.model
        if dist_info.enabled:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.start_epoch = 0
        self.step = 0
        self.best_val = math.inf
        self.best_epoch = -1
        self.history: list[dict] = []

    # ------------------------------------------------------------------ set-up before the first epoch
    def prepare_features(self, *, fit_handcrafted: bool) -> None:
        """Frozen encoder: compute (or read from the cache) the encoder outputs of every spot. Handcrafted
        features: fit their standardisation on the training spots (a fresh run only; a resumed run has it)."""
        t, m = self.tcfg, self.mcfg
        if m.freeze_encoder:
            if t.color_jitter > 0:
                logger.warning("colour jitter is ignored with a frozen encoder (features are computed once)")
            variants = dihedral_variants(flips=t.augment_flips, rot90=t.augment_rot90)
            both = SpotTable.concat([self.train_set, self.val_set])
            feats, self.feature_cache_summary = frozen_features(
                self.model,
                both,
                variants=variants,
                pooled=m.method != "cmrcnet",  # only the reconstruction needs every token
                cache_dir=t.feature_cache or None,
                batch_size=t.batch_size,
                device=self.device,
                precision=self.precision,
                progress=self.progress,
            )
            n = len(self.train_set)
            self.frozen_train = feats.subset(np.arange(n))
            self.frozen_val = feats.subset(np.arange(n, len(both)))
        if fit_handcrafted and self.model.handcrafted is not None:
            if self.frozen_train is not None:
                raw = self.frozen_train.features
            else:
                raw = patch_features(self.train_set.images)
            self.model.handcrafted.fit(raw.to(self.device))
            self.ema = EMA(self.model, t.ema_decay)  # the EMA starts from the fitted standardisation

    # ------------------------------------------------------------------ state
    def state(self, epoch: int) -> dict:
        return {
            "kind": "train_state",
            "epoch": epoch,
            "step": self.step,
            "model_config": self.mcfg.to_dict(),
            "run_config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "history": self.history,
        }

    def load_state(self, ckpt: dict) -> None:
        try:
            self.model.load_state_dict(ckpt["model"])
            self.ema.state = {k: v.float() for k, v in ckpt["ema"].items()}
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scaler and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint does not fit this run ({exc})", path=self.run_dir / LAST_CKPT
            ) from exc
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.step = int(ckpt["step"])
        self.best_val = float(ckpt["best_val"])
        self.best_epoch = int(ckpt["best_epoch"])
        self.history = list(ckpt["history"])

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        t = self.tcfg
        if self.start_epoch >= t.epochs:
            logger.info("run already finished %d epochs", t.epochs)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for epoch in range(self.start_epoch, t.epochs):
            row = self._train_epoch(epoch, bar)
            # rank 0 validates and shares the result, so every process agrees on the best epoch
            row.update(broadcast_object(self._validate(), self.dist))
            row["is_best"] = False
            if row["val_loss"] < self.best_val:
                self.best_val, self.best_epoch, row["is_best"] = row["val_loss"], epoch, True
            self.history.append(row)
            if self.dist.is_main:
                self._save(epoch, row["is_best"])
            barrier()
            logger.info(
                "epoch %d/%d: train %.4f, val %.4f%s, %.1f spots/s",
                epoch + 1,
                t.epochs,
                row["train_loss"],
                row["val_loss"],
                " (best)" if row["is_best"] else "",
                row["spots_per_s"],
            )
        bar.close()
        return TrainResult(self.run_dir, self.best_epoch, self.best_val, self.history)

    def _train_epoch(self, epoch: int, bar: tqdm) -> dict:
        t, d = self.tcfg, self.dist
        self.model.train()
        torch.manual_seed(_mix(t.seed, epoch, d.rank, 1))  # dropout + masking stream of this epoch/process
        shuffle_gen = torch.Generator().manual_seed(_mix(t.seed, epoch, 0, 2))  # same order on every process
        aug_gen = torch.Generator().manual_seed(_mix(t.seed, epoch, d.rank, 3))
        batches = _batches(
            len(self.train_set), t.batch_size, shuffle_gen, shuffle=True, multiple=d.world_size * t.grad_accum
        )
        sums: dict[str, float] = {}
        n_seen, t0 = 0, time.perf_counter()
        for batch in batches:
            lr = lr_at(self.step, total=self.total_steps, warmup=self.warmup_steps, lr=t.lr, min_lr=t.min_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            local = batch.tensor_split(d.world_size)[d.rank]  # this process's share of the global batch
            micro = local.tensor_split(t.grad_accum)
            self.optimizer.zero_grad(set_to_none=True)
            for i, idx in enumerate(micro):
                sync = i == len(micro) - 1
                ctx = contextlib.nullcontext() if sync or not d.enabled else self.ddp.no_sync()
                with ctx:
                    losses = self._forward(idx, aug_gen)
                    loss = losses["loss"] / len(micro)
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if t.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.ema.update(self.model)
            self.step += 1
            n_seen += len(local)
            rate = n_seen * d.world_size / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(
                epoch=f"{epoch + 1}/{t.epochs}",
                loss=f"{float(losses['loss'].detach()):.4f}",
                spots_s=f"{rate:.1f}",
            )
            bar.update(1)
        seconds = time.perf_counter() - t0
        n_total = n_seen * d.world_size
        if d.enabled:  # losses over the whole global batch, not just this process's share
            totals = torch.tensor([float(n_seen), *sums.values()], dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            n_total = int(totals[0])
            sums = dict(zip(sums, totals[1:].tolist(), strict=True))
        row = {"epoch": epoch + 1, "lr": lr, "seconds": round(seconds, 3)}
        row.update({f"train_{k}": v / max(1, n_total) for k, v in sums.items()})
        row["spots_per_s"] = n_total / max(1e-9, seconds)
        return row

    def _forward(self, idx: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        t = self.tcfg
        expr = self.train_set.expr[idx].to(self.device, non_blocking=True)
        gather: Callable | None = gather_with_grad if self.dist.enabled else None
        if self.frozen_train is not None:
            variant = torch.randint(0, len(self.frozen_train.variants), (len(idx),), generator=gen)
            tokens, features = self._frozen_inputs(self.model, self.frozen_train, idx, variant)
            with autocast_context(self.device, self.precision):
                return self.ddp(None, expr, gather=gather, tokens=tokens, features=features)
        images = (
            augment(
                self.train_set.images[idx],
                gen,
                flips=t.augment_flips,
                rot90=t.augment_rot90,
                color_jitter=t.color_jitter,
            )
            .to(self.device, non_blocking=True)
            .contiguous(memory_format=torch.channels_last)
        )
        with autocast_context(self.device, self.precision):
            return self.ddp(images, expr, gather=gather)

    def _frozen_inputs(
        self, model: nn.Module, feats: FrozenFeatures, idx: torch.Tensor, variant: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cached tokens of spots `idx` under `variant`, and their features standardised by `model`."""
        tokens = feats.tokens[idx, variant].to(self.device, torch.float32)  # (B, T, C)
        features = None
        if model.handcrafted is not None:
            features = model.handcrafted.standardise(feats.features[idx].to(self.device))
        return tokens, features

    def _val_batch_loss(self, model: nn.Module, idx: torch.Tensor) -> float:
        expr = self.val_set.expr[idx].to(self.device)
        if self.frozen_val is not None:
            identity = torch.zeros(len(idx), dtype=torch.long)
            tokens, features = self._frozen_inputs(model, self.frozen_val, idx, identity)
            with autocast_context(self.device, self.precision):
                return float(model(None, expr, tokens=tokens, features=features)["loss"])
        images = augment(self.val_set.images[idx], torch.Generator(), flips=False, rot90=False)
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.precision):
            return float(model(images, expr)["loss"])

    @torch.no_grad()
    def _val_loss(self, model: nn.Module) -> float:
        """Mean validation loss over fixed batches with a fixed masking seed (comparable across epochs)."""
        if len(self.val_set) == 0:
            return float("nan")
        model.eval()
        total, n = 0.0, 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.tcfg.seed)
            for idx in _batches(len(self.val_set), self.tcfg.batch_size, torch.Generator(), shuffle=False):
                total += self._val_batch_loss(model, idx) * len(idx)
                n += len(idx)
            if n < len(self.val_set):  # the tail batch too: every validation spot counts
                tail = torch.arange(n, len(self.val_set))
                if len(tail) >= 2:
                    total += self._val_batch_loss(model, tail) * len(tail)
                    n += len(tail)
        model.train()
        return total / max(1, n)

    def _validate(self) -> dict:
        if not self.dist.is_main:
            return {"val_loss": math.nan, "val_loss_ema": math.nan}
        out = {"val_loss": self._val_loss(self.model)}
        ema_model = copy.deepcopy(self.model)
        ema_model.load_state_dict({k: v.to(self.device) for k, v in self.ema.state.items()})
        out["val_loss_ema"] = self._val_loss(ema_model)
        return out

    # ------------------------------------------------------------------ outputs
    def _save(self, epoch: int, is_best: bool) -> None:
        state = self.state(epoch)
        # best before last: a kill between the two then leaves last.pt one epoch behind (that epoch is redone,
        # identically, on resume) instead of a last.pt that names a best epoch best.pt does not hold
        if is_best:
            save_checkpoint(self.run_dir / BEST_CKPT, state)
        save_checkpoint(self.run_dir / LAST_CKPT, state)
        write_metrics_csv(self.run_dir / METRICS_FILE, self.history)
        try:
            plot_loss_curve(
                self.history, self.run_dir / CURVE_FILE, title=f"{self.mcfg.method} ({self.mcfg.encoder})"
            )
        except Exception as exc:  # a plotting problem must never lose a training run
            logger.warning("could not draw the loss curve: %s", exc)


def _mix(*parts: int) -> int:
    """A 63-bit seed from several integers (stable across runs and platforms)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())


# ---------------------------------------------------------------------- entry point
def fit_run(
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
    """Fit a model on `train_samples` of a prepared dataset and write the run folder into `out_dir` (config, genes,
    checkpoints, metrics, run.json with status "trained"). The reference bank is built by the caller
    (`cmrcnet.workflows.train.train_run`): training never calls inference."""
    info = dist_from_env()
    dev = resolve_device(device, info)
    init_distributed(info, dev)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    run_dir = Path(out_dir)
    dataset = PreparedDataset(data_dir)
    train_samples = list(dict.fromkeys(train_samples))
    dataset.require(train_samples)
    no_image = [s for s in train_samples if not dataset.has_image(s)]
    if no_image:
        raise ConfigError(
            f"training samples need images; {no_image} are expression-only (use them in `bank add`)"
        )

    ckpt = None
    if (run_dir / CONFIG_FILE).exists():
        if not resume:
            raise ConfigError(
                "already holds a run; pass --resume to continue it, or choose another --out", path=run_dir
            )
        if info.is_main:
            remove_stale_temporaries(run_dir)
        if (run_dir / LAST_CKPT).exists():
            ckpt = load_checkpoint(run_dir / LAST_CKPT)
            saved = load_run_config(run_dir / CONFIG_FILE)
            if saved.to_dict() != config.to_dict():
                logger.warning("--resume: using the run's saved config.yaml, not the one given now")
            config = saved
    config.validate()
    # rank 0 measures and decides, so every process computes in the same precision
    choice = resolve_precision(config.train.precision, dev, training=True) if info.is_main else None
    choice = broadcast_object(choice, info)

    common_fov(dataset, train_samples)  # checked on every process, so a mismatch stops them all

    # genes: training samples only (strict) or the paper's union over all samples
    if ckpt is not None:
        gene_list = GeneList.from_dict(json.loads((run_dir / GENES_FILE).read_text()))
    elif info.is_main:
        counts = {s: dataset.read_counts(s) for s in train_samples}
        everything = None
        if config.genes.mode == "paper":
            ids = all_samples_for_paper_genes or dataset.sample_ids()
            everything = {s: dataset.read_counts(s) for s in ids}
        gene_list = select_genes(counts, config=config.genes, all_samples=everything)
    else:
        gene_list = None
    gene_list = broadcast_object(gene_list, info)
    mcfg = config.model_config(n_genes=len(gene_list.genes))

    table = load_spot_table(
        dataset,
        train_samples,
        gene_list.genes,
        img_size=mcfg.img_size,
        target_sum=config.genes.target_sum,
        progress=progress and info.is_main,
    )
    spots_by_sample: dict[str, list[str]] = {}
    for sid, bc in zip(table.sample_ids, table.barcodes, strict=True):
        spots_by_sample.setdefault(sid, []).append(bc)
    val_ids = validation_spots(spots_by_sample, fraction=config.train.val_fraction, seed=config.train.seed)
    val_keys = {f"{s}:{b}" for s, bcs in val_ids.items() for b in bcs}
    keys = table.keys()
    is_val = np.array([k in val_keys for k in keys])
    train_set, val_set = table.subset(np.flatnonzero(~is_val)), table.subset(np.flatnonzero(is_val))
    if len(train_set) < 2:
        raise ConfigError(f"only {len(train_set)} training spots after the validation split")

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
    )
    trainer.prepare_features(fit_handcrafted=ckpt is None)
    if ckpt is not None:
        trainer.load_state(ckpt)
        logger.info("resuming %s after epoch %d", run_dir, trainer.start_epoch)
    if info.is_main:
        _record_session(run_dir, trainer, choice, resumed=ckpt is not None)
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
        meta = json.loads((run_dir / RUN_FILE).read_text())
        meta.update(status="trained", best_epoch=result.best_epoch + 1, best_val_loss=result.best_val_loss)
        write_json(run_dir / RUN_FILE, meta)
    barrier()
    return result


def _record_session(run_dir: Path, trainer: Trainer, choice: PrecisionChoice, *, resumed: bool) -> None:
    """run.json: the precision this session computes in (and, for a fresh run, the encoder's origin and the
    feature cache). A resumed run whose precision changed keeps the earlier choices in `precision_history`."""
    meta = json.loads((run_dir / RUN_FILE).read_text())
    before = meta.get("precision")
    if resumed and before and before.get("precision") != choice.precision:
        logger.warning(
            "resuming in %s; the run's earlier epochs ran in %s", choice.precision, before.get("precision")
        )
        meta.setdefault("precision_history", []).append(before)
    meta["precision"] = choice.to_dict()
    if not resumed:
        meta["encoder_init"] = trainer.encoder_init
        meta["transductive"] = bool((trainer.encoder_init or {}).get("transductive", False))
        meta["feature_cache"] = trainer.feature_cache_summary
    write_json(run_dir / RUN_FILE, meta)


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
    fovs = {round(float(dataset.metadata(s)["fov_um"]), 6) for s in samples}
    if len(fovs) > 1:
        raise ConfigError(f"training samples were prepared with different fields of view {sorted(fovs)} um")
    return fovs.pop()


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
    command: str | None,
) -> None:
    """Everything about a run except weights and metrics, written before the first epoch."""
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
            "fov_um": common_fov(dataset, train_samples),
            "patch_px": sorted(sizes),
            "synthetic": any(m.get("synthetic") for m in metas.values()),
            "gene_mode": gene_list.mode,
            "n_genes": len(gene_list.genes),
            "n_train_spots": len(train_set),
            "n_val_spots": len(val_set),
        },
    )
