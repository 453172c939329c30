"""Training loop: AdamW + cosine schedule, EMA, mixed precision, validation on held-out training spots,
atomic checkpoints every epoch, exact resume, and DistributedDataParallel under torchrun.

Determinism: shuffling and augmentation use generators seeded from (seed, epoch[, rank]) and the global torch
RNG (dropout, masking) is re-seeded at the start of every epoch, so a run resumed from `last.pt` continues
exactly like an uninterrupted one. `cmrcnet.training.fit.fit_run` sets a run up and calls `Trainer.fit`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cmrcnet.data.spots import SpotTable
from cmrcnet.errors import CheckpointError, ConfigError, InputFileError
from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.handcrafted import patch_features
from cmrcnet.plotting.curves import plot_loss_curve
from cmrcnet.run.checkpoint import save_checkpoint
from cmrcnet.run.config import RunConfig
from cmrcnet.run.encoder_source import (
    encoder_reference,
    load_initial_encoder,
    stores_encoder_by_reference,
    with_encoder,
    without_encoder,
)
from cmrcnet.run.layout import BEST_CKPT, CURVE_FILE, LAST_CKPT, METRICS_FILE
from cmrcnet.runtime import autocast_context, resolve_precision
from cmrcnet.training.distributed import DistInfo, barrier, broadcast_object, gather_with_grad
from cmrcnet.training.feature_cache import FrozenFeatures, dihedral_variants, frozen_features
from cmrcnet.training.run_files import write_metrics_csv
from cmrcnet.training.schedule import EMA, index_batches, lr_at, mix_seed
from cmrcnet.training.spots import augment
from cmrcnet.training.validation import frozen_inputs, validation_loss

__all__ = ["EMA", "TrainResult", "Trainer", "lr_at"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)


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
        encoder_ref: dict | None = None,
    ) -> None:
        """`precision`: the resolved precision to compute in (default: `config.train.precision` resolved here).
        `encoder_ref`: the encoder reference of the checkpoint to resume from (its weights file is checked first)."""
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
        self.encoder_ref: dict | None = None  # set when checkpoints store the frozen encoder by reference
        if config.encoder_weights:
            source = encoder_ref["weights"] if encoder_ref else config.encoder_weights
            sha = encoder_ref["sha256"] if encoder_ref else None
            self.encoder_init = load_initial_encoder(self.model, source, sha256=sha)
            if stores_encoder_by_reference(model_config, config):
                self.encoder_ref = encoder_reference(self.model, self.encoder_init, source)
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
            if t.color_jitter > 0 or t.stain_jitter > 0 or t.scale_jitter > 1:
                logger.warning(
                    "colour, stain and resolution jitter are ignored with a frozen encoder (features are computed once)"
                )
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
        """The checkpoint payload; a frozen encoder from a file is stored by reference (`encoder_ref`)."""
        model, ema, ref = self.model.state_dict(), self.ema.state, self.encoder_ref
        if ref is not None:
            model, ema = without_encoder(model, ref), without_encoder(ema, ref)
        return {
            "kind": "train_state",
            "epoch": epoch,
            "step": self.step,
            "model_config": self.mcfg.to_dict(),
            "run_config": self.cfg.to_dict(),
            "model": model,
            "ema": ema,
            "encoder_ref": ref,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "history": self.history,
        }

    def load_state(self, ckpt: dict) -> None:
        """Continue from a checkpoint. One that stores its frozen encoder by reference takes the encoder this
        session loaded, which must come from a file with the recorded SHA-256."""
        ref = ckpt.get("encoder_ref")
        if ref is not None and (self.encoder_init or {}).get("sha256") != ref.get("sha256"):
            raise InputFileError(
                f"encoder weights differ from those the checkpoint {self.run_dir / LAST_CKPT} refers to "
                f"(sha256 {str(ref.get('sha256'))[:12]}...)",
                path=(self.encoder_init or {}).get("path") or self.cfg.encoder_weights,
            )
        try:
            model, ema = ckpt["model"], ckpt["ema"]
            if ref is not None:
                model, ema = with_encoder(model, ref, self.model), with_encoder(ema, ref, self.model)
            self.model.load_state_dict(model)
            self.ema.state = {k: v.detach().float().clone() for k, v in ema.items()}
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
        torch.manual_seed(
            mix_seed(t.seed, epoch, d.rank, 1)
        )  # dropout + masking stream of this epoch/process
        shuffle_gen = torch.Generator().manual_seed(
            mix_seed(t.seed, epoch, 0, 2)
        )  # same order on every process
        aug_gen = torch.Generator().manual_seed(mix_seed(t.seed, epoch, d.rank, 3))
        batches = index_batches(
            len(self.train_set), t.batch_size, shuffle_gen, shuffle=True, multiple=d.world_size * t.grad_accum
        )
        sums: dict[str, float] = {}
        n_seen, t0 = 0, time.perf_counter()
        for batch in batches:
            lr = self._set_lr()
            local = batch.tensor_split(d.world_size)[d.rank]  # this process's share of the global batch
            last_loss = self._accumulate_gradients(local, aug_gen, sums)
            self._optimizer_step()
            n_seen += len(local)
            rate = n_seen * d.world_size / max(1e-9, time.perf_counter() - t0)
            bar.set_postfix(epoch=f"{epoch + 1}/{t.epochs}", loss=f"{last_loss:.4f}", spots_s=f"{rate:.1f}")
            bar.update(1)
        return self._epoch_row(epoch, lr, sums, n_seen, time.perf_counter() - t0)

    def _set_lr(self) -> float:
        """The scheduled learning rate of this step, set on every parameter group."""
        t = self.tcfg
        lr = lr_at(self.step, total=self.total_steps, warmup=self.warmup_steps, lr=t.lr, min_lr=t.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _accumulate_gradients(
        self, local: torch.Tensor, gen: torch.Generator, sums: dict[str, float]
    ) -> float:
        """Backward over this process's share in `grad_accum` micro-batches (DDP syncs on the last); adds the
        summed losses to `sums` and returns the last micro-batch's loss."""
        d = self.dist
        micro = local.tensor_split(self.tcfg.grad_accum)
        self.optimizer.zero_grad(set_to_none=True)
        for i, idx in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = contextlib.nullcontext() if sync or not d.enabled else self.ddp.no_sync()
            with ctx:
                losses = self._forward(idx, gen)
                loss = losses["loss"] / len(micro)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(idx)
        return float(losses["loss"].detach())

    def _optimizer_step(self) -> None:
        """Unscale, clip, step (through the gradient scaler in fp16), then update the EMA."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.tcfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.tcfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1

    def _epoch_row(self, epoch: int, lr: float, sums: dict[str, float], n_seen: int, seconds: float) -> dict:
        """The epoch's metrics row: mean losses over every process's spots, learning rate, time and speed."""
        d = self.dist
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
            tokens, features = frozen_inputs(self.model, self.frozen_train, idx, variant, self.device)
            with autocast_context(self.device, self.precision):
                return self.ddp(None, expr, gather=gather, tokens=tokens, features=features)
        images = (
            augment(
                self.train_set.images[idx],
                gen,
                flips=t.augment_flips,
                rot90=t.augment_rot90,
                color_jitter=t.color_jitter,
                stain_jitter=t.stain_jitter,
                scale_jitter=t.scale_jitter,
            )
            .to(self.device, non_blocking=True)
            .contiguous(memory_format=torch.channels_last)
        )
        with autocast_context(self.device, self.precision):
            return self.ddp(images, expr, gather=gather)

    def _val_loss(self, model: nn.Module) -> float:
        """Mean validation loss of `model` (fixed batches and masking seed: comparable across epochs)."""
        return validation_loss(
            model,
            self.val_set,
            frozen=self.frozen_val,
            batch_size=self.tcfg.batch_size,
            seed=self.tcfg.seed,
            device=self.device,
            precision=self.precision,
        )

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
