"""The confidence reference of a run: the retrieval similarity its own validation spots reach.

A new slide's tiles are judged against what retrieval looked like on the training sections. When a run's bank
is built (`cmrcnet.workflows.train.train_run`), the images of the run's validation spots (run folder
spots.json) are embedded and retrieved from the bank:

- "other_samples" (the bank holds two or more samples): each spot retrieves from the bank without its own
  sample (`Bank.without_sample`), as a spot of a new section would;
- "other_split" (a single training sample, so leaving it out leaves nothing): each spot retrieves from the bank
  without the validation spots themselves, i.e. from the sample's training spots. Neighbouring spots of the same
  section are more alike than spots of another section, so this reference is higher (stricter) than the first.

The quantiles of their `retrieval_similarity` are written to RUN_DIR/confidence_reference.json
(`cmrcnet.inference.confidence.ConfidenceReference`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.spots import load_spot_table
from cmrcnet.inference.bank import Bank
from cmrcnet.inference.confidence import (
    ConfidenceReference,
    NeighbourConfidence,
    save_confidence_reference,
    summarise_similarity,
)
from cmrcnet.inference.kchoice import bank_training_samples, resolve_k
from cmrcnet.inference.predict import BankRetriever, embed_patches, normalise_as_trained
from cmrcnet.run.layout import SPOTS_FILE
from cmrcnet.run.load import TrainedModel

logger = logging.getLogger(__name__)


def validation_spots(run_dir: str | Path) -> dict[str, list[str]]:
    """{sample: [barcode, ...]} of the run's validation spots (spots.json); {} when there are none."""
    path = Path(run_dir) / SPOTS_FILE
    if not path.is_file():
        return {}
    spots = json.loads(path.read_text()).get("validation", {})
    return {str(s): [str(b) for b in bcs] for s, bcs in spots.items() if bcs}


def build_confidence_reference(
    trained: TrainedModel,
    bank: Bank,
    dataset: PreparedDataset,
    spots: dict[str, list[str]],
    *,
    k: int | None = None,
    weighting: str | None = None,
    batch_size: int = 128,
    progress: bool = False,
) -> ConfidenceReference | None:
    """Retrieve the validation `spots` from `bank` and summarise their retrieval similarity.

    Parameters
    ----------
    trained
        The model whose bank this is.
    bank
        Its reference bank.
    dataset
        The prepared dataset holding the spots' patches.
    spots
        {sample: [barcode, ...]} of the validation spots (`validation_spots`).
    k, weighting
        Retrieval settings; default the run's.
    batch_size
        Patches per forward pass.
    progress
        Show progress bars.

    Returns
    -------
    ConfidenceReference or None
        None (logged) when there is no validation spot with an image, or nothing left to retrieve from.
    """
    rcfg = trained.run_config
    k = resolve_k(trained, bank, k)
    weighting = rcfg.retrieval.weighting if weighting is None else weighting
    samples = [s for s in spots if dataset.has_image(s)]
    if not samples:
        logger.info("no validation spots with an image: no confidence reference")
        return None
    table = load_spot_table(
        dataset, samples, None, img_size=trained.model_config.img_size, target_sum=rcfg.genes.target_sum,
        progress=progress,
    )  # fmt: skip
    normalise_as_trained(trained, table)  # a model trained on normalised patches: its validation spots too
    wanted = {f"{s}:{b}" for s in samples for b in spots[s]}
    keys = table.keys()
    rows = np.array([i for i, key in enumerate(keys) if key in wanted], dtype=np.int64)
    if not rows.size:
        logger.info("the validation spots of spots.json are not in the dataset: no confidence reference")
        return None
    emb = embed_patches(
        trained, table.images[rows], batch_size=batch_size, precision="fp32", progress=progress
    )
    row_samples = np.asarray(table.sample_ids)[rows]
    conf = NeighbourConfidence.empty(len(rows))
    used_k = []  # k after clamping to each (reduced) bank
    # leave-one-sample-out among the training samples (spots added with `bank add` are always retrievable); with
    # one training sample, only the validation spots themselves are left out
    if len(bank_training_samples(trained, bank)) > 1:
        source = "other_samples"
        for sid in dict.fromkeys(row_samples.tolist()):
            mine = np.flatnonzero(row_samples == sid)
            others = bank.select(np.array([key.split(":", 1)[0] != sid for key in bank.keys], dtype=bool))
            if not len(others):
                continue
            retriever = BankRetriever(others, k=k, weighting=weighting)
            conf.put(mine, retriever.retrieve(emb[mine])[1])
            used_k.append(retriever.k)
    else:
        source = "other_split"
        rest = bank.select(np.array([key not in wanted for key in bank.keys], dtype=bool))
        if not len(rest):
            logger.info("the bank holds only validation spots: no confidence reference")
            return None
        retriever = BankRetriever(rest, k=k, weighting=weighting)
        conf = retriever.retrieve(emb)[1]
        used_k.append(retriever.k)
    similarity = conf.similarity[np.isfinite(conf.similarity)]
    if not similarity.size:
        logger.info("no validation spot could be retrieved: no confidence reference")
        return None
    return ConfidenceReference(
        summarise_similarity(similarity),
        n=int(similarity.size),
        source=source,
        k=min(used_k),
        fingerprint=trained.fingerprint,
        extra={
            "mean": float(similarity.mean()),
            "median_spread": float(np.nanmedian(conf.spread)),
            "weighting": weighting,
            "samples": sorted(set(row_samples.tolist())),
            "checkpoint": trained.checkpoint,
        },
    )


def write_confidence_reference(
    trained: TrainedModel,
    bank: Bank,
    data_dir: str | Path,
    *,
    progress: bool = False,
) -> Path | None:
    """Build the run's confidence reference from its validation spots and write it (atomically) into the run
    folder; returns its path, or None when the run has no validation spots to measure."""
    spots = validation_spots(trained.run_dir)
    if not spots:
        logger.info("%s lists no validation spots: no confidence reference", SPOTS_FILE)
        return None
    reference = build_confidence_reference(trained, bank, PreparedDataset(data_dir), spots, progress=progress)
    if reference is None:
        return None
    path = save_confidence_reference(reference, trained.run_dir)
    logger.info(
        "confidence reference: retrieval similarity of %d validation spots (%s): 5th percentile %.3f, median %.3f",
        reference.n,
        reference.source,
        reference.low,
        reference.quantiles["50"],
    )
    return path
