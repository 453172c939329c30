"""The reference bank: expression embeddings and log1p expression of measured spots, searched at prediction.

Retrieval needs only expression, so samples without an image (e.g. her2st C1) can join the bank.
Saved as RUN_DIR/bank.pt: tensors and plain lists only, loaded with weights_only=True.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cmrcnet import __version__
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.spots import load_spot_table
from cmrcnet.errors import CheckpointError, ConfigError, InputFileError
from cmrcnet.run.checkpoint import load_checkpoint, save_checkpoint
from cmrcnet.run.layout import BANK_FILE
from cmrcnet.run.load import TrainedModel

logger = logging.getLogger(__name__)


@dataclass
class Bank:
    """Measured spots to retrieve from."""

    embeddings: torch.Tensor  # (N, D) float32 expression embeddings
    expression: torch.Tensor  # (N, G) float32 log1p expression of the model's genes
    keys: list[str]  # (N,) "sample:barcode"
    samples: list[str]  # sample ids in the bank, in order
    genes: list[str]  # the model's genes (columns of `expression`)
    fingerprint: str  # weights that made the embeddings

    def __len__(self) -> int:
        return len(self.keys)

    def without_sample(self, sample_id: str) -> Bank:
        """The bank without `sample_id`'s own spots: a sample never retrieves itself (that would be a leak).

        Logs a warning when there were such spots; a bank holding nothing else is a ConfigError."""
        keep = np.array([k.split(":", 1)[0] != sample_id for k in self.keys], dtype=bool)
        if keep.all():
            return self
        logger.warning(
            "sample %s is in the reference bank: its own spots are excluded from its retrieval", sample_id
        )
        if not keep.any():
            raise ConfigError(f"the reference bank holds no spots other than sample {sample_id}'s own")
        return self.select(keep)

    def select(self, keep: np.ndarray) -> Bank:
        """The bank's spots where the boolean (N,) `keep` is True (samples left without spots are dropped)."""
        keep = np.asarray(keep, dtype=bool)
        idx = torch.from_numpy(np.flatnonzero(keep))
        keys = [k for k, m in zip(self.keys, keep, strict=True) if m]
        present = {k.split(":", 1)[0] for k in keys}
        return Bank(
            self.embeddings[idx],
            self.expression[idx],
            keys,
            [s for s in self.samples if s in present],
            self.genes,
            self.fingerprint,
        )

    def to_payload(self) -> dict:
        return {
            "kind": "bank",
            "embeddings": self.embeddings.contiguous(),
            "expression": self.expression.contiguous(),
            "keys": list(self.keys),
            "samples": list(self.samples),
            "genes": list(self.genes),
            "fingerprint": self.fingerprint,
            "cmrcnet_version": __version__,
        }

    @classmethod
    def from_payload(cls, data: dict, *, path: Path) -> Bank:
        try:
            bank = cls(
                data["embeddings"].float(),
                data["expression"].float(),
                list(data["keys"]),
                list(data["samples"]),
                list(data["genes"]),
                str(data["fingerprint"]),
            )
        except (KeyError, AttributeError) as exc:
            raise CheckpointError(f"not a cmrcnet bank ({exc})", path=path) from exc
        n = len(bank.keys)
        if bank.embeddings.shape[0] != n or bank.expression.shape != (n, len(bank.genes)):
            raise CheckpointError("bank arrays have inconsistent shapes", path=path)
        return bank


@torch.no_grad()
def embed_expression(trained: TrainedModel, expr: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """Expression (N, G) -> spot embeddings (N, D) in fp32 with the model in eval mode."""
    model = trained.model
    device = next(model.parameters()).device
    out = [
        model.encode_expression(expr[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(expr), batch_size)
    ]
    return torch.cat(out) if out else torch.empty((0, trained.model_config.proj_dim))


def build_bank(
    trained: TrainedModel,
    dataset: PreparedDataset,
    samples: Sequence[str],
    *,
    allow_missing_genes: bool = False,
    progress: bool = True,
) -> Bank:
    """Embed the measured expression of `samples` (images not needed)."""
    if trained.model_config.method == "regression":
        raise ConfigError("the regression method predicts directly and uses no reference bank")
    dataset.require(list(samples))
    table = load_spot_table(
        dataset,
        samples,
        trained.genes,
        img_size=None,
        target_sum=trained.run_config.genes.target_sum,
        allow_missing_genes=allow_missing_genes,
        progress=progress,
    )
    emb = embed_expression(trained, table.expr)
    return Bank(
        emb,
        table.expr.clone(),
        table.keys(),
        list(dict.fromkeys(samples)),
        list(trained.genes),
        trained.fingerprint,
    )


def merge_banks(base: Bank, extra: Bank) -> Bank:
    """`base` plus `extra`; samples present in both are replaced by `extra`'s version."""
    if base.genes != extra.genes or base.fingerprint != extra.fingerprint:
        raise ConfigError("banks of different models (genes or weights) cannot be merged")
    replaced = set(extra.samples)
    keep = np.array([k.split(":", 1)[0] not in replaced for k in base.keys], dtype=bool)
    idx = torch.from_numpy(np.flatnonzero(keep))
    return Bank(
        torch.cat([base.embeddings[idx], extra.embeddings]),
        torch.cat([base.expression[idx], extra.expression]),
        [k for k, m in zip(base.keys, keep, strict=True) if m] + extra.keys,
        [s for s in base.samples if s not in replaced] + extra.samples,
        base.genes,
        base.fingerprint,
    )


def save_bank(bank: Bank, run_dir: str | Path) -> Path:
    path = Path(run_dir) / BANK_FILE
    save_checkpoint(path, bank.to_payload())
    return path


def load_bank(run_dir: str | Path, trained: TrainedModel | None = None) -> Bank:
    path = Path(run_dir) / BANK_FILE
    if not path.is_file():
        raise InputFileError("no reference bank in this run; build it with `cmrcnet bank build`", path=path)
    bank = Bank.from_payload(load_checkpoint(path), path=path)
    if trained is not None:
        if bank.genes != trained.genes:
            raise CheckpointError("bank genes differ from the model's genes", path=path)
        if bank.fingerprint != trained.fingerprint:
            raise CheckpointError(
                f"bank was embedded with weights {bank.fingerprint}, not {trained.fingerprint}; "
                "rebuild it with `cmrcnet bank build`",
                path=path,
            )
    return bank
