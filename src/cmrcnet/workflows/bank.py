"""Build or extend a run's reference bank, then choose its retrieval k and measure its confidence reference
again: `cmrcnet bank` and `Model.add_to_bank`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cmrcnet.constants import BANK_ACTIONS
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.inference.bank import Bank, build_bank, load_bank, merge_banks, save_bank
from cmrcnet.inference.confidence_reference import write_confidence_reference
from cmrcnet.inference.kchoice import AUTO, bank_training_samples, training_dataset, update_run_k
from cmrcnet.run.load import TrainedModel

logger = logging.getLogger(__name__)


@dataclass
class BankUpdate:
    """What `update_bank` did: the bank now on disk and the k prediction will use with it."""

    bank: Bank
    path: Path
    k: int | None  # None: the regression method (no retrieval), or k not chosen again (the last choice stays)
    k_note: str  # how k was settled (chosen again, fixed in the config, or why the last choice stays)


def update_bank(
    trained: TrainedModel,
    data_dir: str | Path,
    samples: Sequence[str],
    *,
    action: str = "add",
    allow_missing_genes: bool = False,
    progress: bool = True,
) -> BankUpdate:
    """Embed `samples`' expression into the run's bank (`action` "add": next to the bank's spots, replacing earlier
    versions of the same samples; "build": instead of them), save it, and choose the run's retrieval k for the new
    bank when its config says ``retrieval.k: auto`` (`cmrcnet.inference.kchoice`). With other patients'
    expression-only sections in the bank the best k is far larger than for the training sections alone, so a k
    chosen for the old bank would be wrong for the new one. The confidence reference (the validation spots'
    retrieval similarity, confidence_reference.json) is then measured again with the new bank and k."""
    if action not in BANK_ACTIONS:
        raise ConfigError(f"bank action must be one of {BANK_ACTIONS}, got {action!r}")
    dataset = PreparedDataset(data_dir)
    new = build_bank(trained, dataset, list(samples), allow_missing_genes=allow_missing_genes, progress=progress)
    bank = merge_banks(load_bank(trained.run_dir, trained), new) if action == "add" else new
    path = save_bank(bank, trained.run_dir)
    logger.info("reference bank %s: %d spots from samples %s", path, len(bank), bank.samples)
    if trained.model_config.method == "regression":
        return BankUpdate(bank, path, None, "the regression method does not retrieve")
    k, note = _settle_k(trained, bank, dataset, progress=progress)
    # the validation spots' similarities, measured again with this bank and k, so that predictions compare like
    # with like (a larger k averages over farther neighbours, which lowers similarities)
    train_samples = bank_training_samples(trained, bank)
    try:
        write_confidence_reference(trained, bank, training_dataset(trained, dataset, train_samples).root,
                                   progress=progress)  # fmt: skip
    except (ConfigError, InputFileError) as exc:
        logger.warning("%s: confidence reference not measured again (%s); the earlier one stays", trained.run_dir,
                       exc)  # fmt: skip
    return BankUpdate(bank, path, k, note)


def _settle_k(trained: TrainedModel, bank: Bank, dataset: PreparedDataset, *, progress: bool) -> tuple[int | None, str]:
    fixed = trained.run_config.retrieval.k
    if fixed != AUTO:
        return int(fixed), f"fixed in the run's config (retrieval.k: {fixed})"
    if not bank_training_samples(trained, bank):
        note = "not chosen again: the bank holds none of the training samples to choose it with (the last choice stays)"
        logger.warning("%s: retrieval k %s", trained.run_dir, note)
        return None, note
    try:
        k = update_run_k(trained, bank, dataset, progress=progress)
    except ConfigError as exc:
        note = f"not chosen again ({exc}); the last choice stays (predict --k overrides it)"
        logger.warning("%s: retrieval k %s", trained.run_dir, note)
        return None, note
    return k, "chosen for this bank by leave-one-training-section-out (retrieval_k.json)"


__all__ = ["BankUpdate", "update_bank"]
