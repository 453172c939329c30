"""`cmrcnet predict`: embed patches of prepared samples and predict expression by retrieval (or regression)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cmrcnet import __version__
from cmrcnet.atomic import atomic_path
from cmrcnet.constants import CMRCNET_UNS, DEFAULT_SMOOTH, DEFAULT_STAIN_NORMALISE, SAMPLE_KEY, SPATIAL_KEY
from cmrcnet.data.dataset import PreparedDataset, same_fov
from cmrcnet.data.hdf5 import write_h5ad
from cmrcnet.data.spots import load_spot_table
from cmrcnet.data.stain import DEFAULT_STAIN_RULE, LabStats, check_rule, load_stain_reference, normalise_table
from cmrcnet.errors import ConfigError
from cmrcnet.inference.bank import Bank, load_bank
from cmrcnet.inference.confidence import (
    SIMILARITY_KEY,
    SPREAD_KEY,
    NeighbourConfidence,
    confidence_provenance,
    load_confidence_reference,
    neighbour_confidence,
)
from cmrcnet.inference.export import SPATIAL_UNS, SPOT_DIAMETER_UM, spatial_library
from cmrcnet.inference.kchoice import resolve_k
from cmrcnet.inference.retrieval import WEIGHTINGS, aggregate, clamp_k, make_index
from cmrcnet.inference.smoothing import check_weight, smooth_neighbours
from cmrcnet.models.preprocess import images_to_float
from cmrcnet.run.layout import STAIN_REFERENCE_FILE
from cmrcnet.run.load import TrainedModel, load_trained_model
from cmrcnet.runtime import PrecisionChoice, autocast_context, resolve_precision

logger = logging.getLogger(__name__)


@torch.no_grad()
def embed_patches(
    trained: TrainedModel,
    images: torch.Tensor,
    *,
    batch_size: int = 128,
    precision: str = "auto",
    progress: bool = False,
    regression: bool = False,
) -> torch.Tensor:
    """uint8 patches (N, S, S, 3) at the model's input size -> image embeddings (N, D) (or expression (N, G)
    for the regression method when `regression`), fp32 on the CPU. `precision` as in `resolve_precision`."""
    model = trained.model
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device).precision
    out = []
    for i in tqdm(
        range(0, len(images), batch_size), desc="embedding", unit="batch", disable=not progress, leave=False
    ):
        x = images_to_float(images[i : i + batch_size], layout="nhwc")  # (b, 3, S, S) normalised
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        with autocast_context(device, precision):
            y = model.predict_expression(x) if regression else model.embed_images(x)
        out.append(y.float().cpu())
    width = trained.model_config.n_genes if regression else trained.model_config.proj_dim
    return torch.cat(out) if out else torch.empty((0, width))


class BankRetriever:
    """A reference bank made ready once for many query batches (a whole slide, one sample's spots).

    The search index is built, and the bank's embeddings normalised and checked, here rather than for every
    batch. `exclude_sample`'s own spots are left out (`Bank.without_sample`).
    """

    def __init__(
        self,
        bank: Bank,
        *,
        k: int,
        weighting: str = "mean",
        backend: str = "exact",
        exclude_sample: str | None = None,
    ) -> None:
        self.bank = bank if exclude_sample is None else bank.without_sample(exclude_sample)
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.k = clamp_k(k, len(self.bank))  # once per bank, not once per batch
        self.weighting = weighting
        self.index = make_index(backend)
        self.index.add(self.bank.embeddings)
        self.expression = self.bank.expression.numpy()  # (N, G)

    def predict(self, query: torch.Tensor | np.ndarray) -> np.ndarray:
        """(Q, D) image embeddings -> (Q, G) float32 predictions (mean or similarity-weighted neighbours)."""
        return self.retrieve(query, confidence=False)[0]

    def retrieve(
        self, query: torch.Tensor | np.ndarray, *, confidence: bool = True
    ) -> tuple[np.ndarray, NeighbourConfidence | None]:
        """(Q, D) image embeddings -> (Q, G) float32 predictions and, with `confidence`, each query's retrieval
        similarity and neighbour spread (`cmrcnet.inference.confidence`). The predictions are those of
        `predict`, from the same search."""
        sims, idx = self.index.search(query, self.k)
        pred = np.asarray(aggregate(idx, sims, self.expression, weighting=self.weighting), dtype=np.float32)
        return pred, neighbour_confidence(idx, sims, self.expression) if confidence else None


def predict_from_embeddings(
    query: torch.Tensor,
    query_samples: Sequence[str],
    bank: Bank,
    *,
    k: int,
    weighting: str,
    backend: str = "exact",
) -> np.ndarray:
    """Retrieval predictions (Q, G); a query never retrieves spots of its own sample (that would be a leak)."""
    return retrieve_from_embeddings(
        query, query_samples, bank, k=k, weighting=weighting, backend=backend, confidence=False
    )[0]


def retrieve_from_embeddings(
    query: torch.Tensor,
    query_samples: Sequence[str],
    bank: Bank,
    *,
    k: int,
    weighting: str,
    backend: str = "exact",
    confidence: bool = True,
) -> tuple[np.ndarray, NeighbourConfidence | None]:
    """`predict_from_embeddings` plus, with `confidence`, each query's retrieval confidence (row-aligned)."""
    preds = np.zeros((len(query), len(bank.genes)), dtype=np.float32)
    conf = NeighbourConfidence.empty(len(query)) if confidence else None
    query_samples = np.asarray(query_samples)
    for sid in dict.fromkeys(query_samples.tolist()):
        rows = np.flatnonzero(query_samples == sid)
        retriever = BankRetriever(bank, k=k, weighting=weighting, backend=backend, exclude_sample=sid)
        preds[rows], part = retriever.retrieve(query[torch.from_numpy(rows)], confidence=confidence)
        if conf is not None and part is not None:
            conf.put(rows, part)
    return preds, conf


def prediction_provenance(
    trained: TrainedModel,
    bank: Bank | None,
    *,
    kind: str,
    k: int,
    weighting: str,
    backend: str,
    run_dir: str | Path,
    precision: PrecisionChoice,
) -> dict:
    """What made a prediction, for `uns["cmrcnet"]` of every prediction file (spots or slide tiles)."""
    retrieval = bank is not None
    return {
        "precision": precision.precision,
        "precision_requested": precision.requested,
        "precision_reason": precision.reason,
        "kind": kind,
        "values": "log1p(library-size normalised expression)",
        "method": trained.model_config.method,
        "run_dir": str(Path(run_dir).resolve()),
        "checkpoint": trained.checkpoint,
        "weights": trained.weights,
        "epoch": trained.epoch,
        "train_samples": list(trained.run_info.get("train_samples", [])),
        "bank_samples": list(bank.samples) if retrieval else [],
        "gene_mode": trained.gene_mode,
        "target_sum": float(trained.run_config.genes.target_sum),
        "k": int(k) if retrieval else 0,
        "weighting": weighting if retrieval else "none",
        "backend": backend if retrieval else "none",
        "synthetic": bool(trained.run_info.get("synthetic", False)),
        # the encoder was pretrained on test slides too (`cmrcnet pretrain --include-test-slides`)
        "transductive": bool(trained.run_info.get("transductive", False)),
        "cmrcnet_version": __version__,
    }


def predict_samples(
    run_dir: str | Path,
    data_dir: str | Path,
    samples: Sequence[str],
    out_path: str | Path | None,
    *,
    checkpoint: str | None = None,
    use_ema: bool | None = None,
    k: int | None = None,
    weighting: str | None = None,
    backend: str = "exact",
    batch_size: int = 128,
    precision: str = "auto",
    device: str = "cpu",
    progress: bool = True,
    stain_normalise: bool | None = None,
    stain_rule: str = DEFAULT_STAIN_RULE,
    smooth: float = DEFAULT_SMOOTH,
) -> ad.AnnData:
    """Predict log1p expression for every spot of `samples`; write PRED.h5ad atomically when `out_path` is given.

    `precision`: "auto" (default; measured, see `cmrcnet.runtime.resolve_precision`), "fp32", "bf16" or "fp16".
    `stain_normalise`: map each sample's colours onto the run's training patches first (`resolve_stain_target`;
    None: the default, `cmrcnet.constants.DEFAULT_STAIN_NORMALISE`), by `stain_rule` (`cmrcnet.data.stain`:
    "contrast", the default, or "reinhard").
    """
    trained = load_trained_model(run_dir, checkpoint=checkpoint, use_ema=use_ema, device=device)
    bank = None if trained.model_config.method == "regression" else load_bank(run_dir, trained)
    return predict_spots(
        trained,
        bank,
        data_dir,
        samples,
        out_path,
        k=k,
        weighting=weighting,
        backend=backend,
        batch_size=batch_size,
        precision=precision,
        progress=progress,
        stain_target=resolve_stain_target(trained, stain_normalise),
        stain_rule=stain_rule,
        smooth=smooth,
    )


def stain_note(rule: str, done: dict[str, str]) -> str:
    """Provenance of the stain normalisation: the rule and, per sample, what it did (`stain.describe`)."""
    per = "; ".join(f"{sid}: {line}" for sid, line in done.items())
    return (
        f"rule {rule!r} (L*a*b*, slide-level statistics) onto the training patches' colours; black background white"
        + (f"; {per}" if per else "")
    )


def run_stain_target(trained: TrainedModel) -> LabStats:
    """The colour statistics of a run's training patches (stain_reference.json, written with the bank)."""
    return load_stain_reference(Path(trained.run_dir) / STAIN_REFERENCE_FILE)


def normalise_as_trained(trained: TrainedModel, table) -> None:
    """Map a SpotTable of the run's training samples (in place) onto the run's stain reference when the run
    trained on stain-normalised patches (``train.stain_normalise``), so they are embedded as in training (the
    retrieval k's choice and the confidence reference); otherwise leave it as it is."""
    if trained.run_config.train.stain_normalise:
        normalise_table(table, run_stain_target(trained), rule=trained.run_config.train.stain_rule)


def check_same_fov(trained: TrainedModel, dataset: PreparedDataset, samples: Sequence[str]) -> None:
    """Samples whose patches cover another field of view than the run's training patches are refused: the model
    would read tissue at another scale. Runs that record no field of view (older versions) are not checked."""
    if trained.run_info.get("fov_um") is None:
        return
    run_fov = float(trained.run_info["fov_um"])
    fovs = {s: float(dataset.metadata(s)["fov_um"]) for s in samples}
    other = [f"{s} ({fov:g} um)" for s, fov in fovs.items() if not same_fov(fov, run_fov)]
    if other:
        raise ConfigError(
            f"{', '.join(other)}: prepared with another field of view than the run's training patches ({run_fov:g} "
            f"um); prepare them again with fov_um={run_fov:g}",
            path=dataset.root,
        )


def warn_if_other_rule(trained: TrainedModel, rule: str) -> None:
    """A log warning when a run that trained on stain-normalised patches is given patches mapped by another rule."""
    train = trained.run_config.train
    if train.stain_normalise and rule != train.stain_rule:
        logger.warning(
            "%s: the run trained on patches colour-normalised by the %r rule, these are normalised by %r; pass "
            "stain_rule=%r to map them as in training",
            trained.run_dir,
            train.stain_rule,
            rule,
            train.stain_rule,
        )


def resolve_stain_target(trained: TrainedModel, stain_normalise: bool | None) -> LabStats | None:
    """The colours to normalise onto, or None for no stain normalisation.

    True: the run's stain reference (an error where the run has none); False: none; None: the default
    (`DEFAULT_STAIN_NORMALISE`), which a run made before stain references existed skips with a log line."""
    if stain_normalise is None:
        if not DEFAULT_STAIN_NORMALISE:
            return None
        path = Path(trained.run_dir) / STAIN_REFERENCE_FILE
        if not path.is_file():
            logger.warning(
                "%s: the run has no stain reference (%s; trained before stain normalisation existed): predicting "
                "without stain normalisation",
                trained.run_dir,
                STAIN_REFERENCE_FILE,
            )
            return None
    elif not stain_normalise:
        return None
    return run_stain_target(trained)


def predict_spots(
    trained: TrainedModel,
    bank: Bank | None,
    data_dir: str | Path,
    samples: Sequence[str],
    out_path: str | Path | None = None,
    *,
    k: int | None = None,
    weighting: str | None = None,
    backend: str = "exact",
    batch_size: int = 128,
    precision: str = "auto",
    progress: bool = True,
    stain_target: LabStats | None = None,
    stain_rule: str = DEFAULT_STAIN_RULE,
    smooth: float = DEFAULT_SMOOTH,
) -> ad.AnnData:
    """`predict_samples` for a model already loaded (and its bank; None for the regression method).

    `stain_target`: colour statistics to map each sample's patches onto before embedding (slide-level, by
    `stain_rule`; `cmrcnet.data.stain`), e.g. those of the training patches for a slide from another scanner;
    None: as is.
    `smooth`: weight of the neighbouring spots' predictions (`cmrcnet.inference.smoothing`; default 0.5,
    measured in benchmarks/results/her2st_accuracy.md; 0: none).

    Writes X (spots x genes), obs "sample_id", "barcode", "library_id", obsm "spatial", uns "spatial" and
    uns "cmrcnet" (provenance). Retrieval methods also write obs "retrieval_similarity" and "neighbour_spread"
    (`cmrcnet.inference.confidence`) and, when the run holds confidence_reference.json, uns["cmrcnet"]
    "confidence_reference" (its quantiles) and "fraction_below_reference_p5".
    """
    check_weight(smooth)  # before the (long) prediction
    check_rule(stain_rule)
    device = next(trained.model.parameters()).device
    choice = resolve_precision(precision, device)
    dataset = PreparedDataset(data_dir)
    samples = list(dict.fromkeys(samples))
    dataset.require(samples)
    no_image = [s for s in samples if not dataset.has_image(s)]
    if no_image:
        raise ConfigError(f"samples {no_image} have no image to predict from")
    check_same_fov(trained, dataset, samples)
    in_training = [s for s in samples if s in trained.run_info.get("train_samples", [])]
    if in_training:
        logger.warning("samples %s were used for training: their predictions are not a test", in_training)
    rcfg = trained.run_config
    regression = trained.model_config.method == "regression"
    k = None if regression else resolve_k(trained, bank, k)
    weighting = rcfg.retrieval.weighting if weighting is None else weighting
    table = load_spot_table(
        dataset,
        samples,
        None,
        img_size=trained.model_config.img_size,
        target_sum=rcfg.genes.target_sum,
        progress=progress,
    )
    stained = {}
    if stain_target is not None:
        warn_if_other_rule(trained, stain_rule)
        stained = normalise_table(table, stain_target, rule=stain_rule)
        for sid, line in stained.items():
            logger.info("%s: patches colour-normalised to the stain target (%s)", sid, line)
    emb = embed_patches(
        trained,
        table.images,
        batch_size=batch_size,
        precision=choice.precision,
        progress=progress,
        regression=regression,
    )
    conf = None
    if regression:
        bank = None
        pred = emb.numpy().astype(np.float32)
    else:
        if bank is None:
            raise ConfigError(f"the {trained.model_config.method} method needs its reference bank")
        pred, conf = retrieve_from_embeddings(
            emb, table.sample_ids, bank, k=k, weighting=weighting, backend=backend
        )
    if smooth:
        pred = smooth_neighbours(pred, table.coords, weight=smooth, groups=np.asarray(table.sample_ids))
    adata = ad.AnnData(pred)
    adata.var_names = list(trained.genes)
    adata.obs_names = table.keys()
    adata.obs[SAMPLE_KEY] = pd.Categorical(table.sample_ids)
    adata.obs["barcode"] = table.barcodes
    adata.obsm[SPATIAL_KEY] = table.coords
    if conf is not None:
        adata.obs[SIMILARITY_KEY] = conf.similarity
        adata.obs[SPREAD_KEY] = conf.spread
    reference = (
        None if conf is None else load_confidence_reference(trained.run_dir, fingerprint=trained.fingerprint)
    )
    adata.uns[CMRCNET_UNS] = {
        **prediction_provenance(
            trained,
            bank,
            kind="prediction",
            k=k,
            weighting=weighting,
            backend=backend,
            run_dir=trained.run_dir,
            precision=choice,
        ),
        "data_dir": str(dataset.root.resolve()),
        **confidence_provenance(conf, reference, k=k),
    }
    adata.uns[CMRCNET_UNS]["stain_normalisation"] = (
        stain_note(stain_rule, stained) if stain_target is not None else "none"
    )
    adata.uns[CMRCNET_UNS]["smoothing_weight"] = float(smooth)
    _add_tissue_images(adata, dataset, samples)
    if out_path is not None:
        with atomic_path(out_path) as tmp:
            write_h5ad(adata, tmp)
    return adata


def _add_tissue_images(adata: ad.AnnData, dataset: PreparedDataset, samples: Sequence[str]) -> None:
    """scanpy's `uns["spatial"]` (one library per sample: its thumbnail and spot diameter) and
    `obs["library_id"]`, so `sc.pl.spatial(pred, color=gene)` draws on the tissue with no extra arguments."""
    libraries = {}
    for sid in samples:
        thumb = dataset.thumbnail(sid)
        if thumb is None:
            continue
        meta = dataset.metadata(sid)
        um = float(meta["pixel_size_um"])
        diameter_um = SPOT_DIAMETER_UM.get(str(meta.get("technology", "")).lower(), float(meta["fov_um"]))
        libraries[sid] = spatial_library(thumb[0], thumb[1], diameter_um / um)
    if libraries:
        adata.uns[SPATIAL_UNS] = libraries
    adata.obs["library_id"] = pd.Categorical(adata.obs[SAMPLE_KEY].astype(str))
