"""Choosing the number of retrieved neighbours k the way a new patient is predicted: from other sections.

Leave-one-training-section-out: every training section in turn is the query; the bank is the other training
sections (plus any bank sections that are not training sections, e.g. expression-only sections added with
`cmrcnet bank add`, which are always retrievable and never queries); the prediction is the mean expression of the
k nearest bank spots; the score is the mean over validation sections of the mean per-gene PCC over the HEG genes
of the training spots (genes constant in the prediction score 0). Only training spots and bank spots are read.

With a single training section, leave-one-section-out is impossible: the section is cut into two spatial halves
(by the median x coordinate) and each half retrieves from the other (labelled "two spatial halves").

A run whose config says ``retrieval.k: auto`` (the default) chooses k from `K_GRID` this way when its bank is
built (`cmrcnet train`) and again whenever the bank changes (`cmrcnet bank add` / `bank build`), and writes the
choice to RUN_DIR/retrieval_k.json; `predict`, `predict-slide` and the confidence reference read it
(`resolve_k`). How much it matters (README, "Expression-only sections in the bank"): with 19 expression-only
sections of six other patients added to the bank of the default model trained on C2-C6, k = 50 (the former fixed
default) predicted held-out B4 at HEG-50 PCC 0.060 and the chosen k (800-1600) at 0.139 (3 seeds). With the
training sections alone the chosen k (100) and k = 50 differ by about 0.01 (0.159 against 0.170 on B4).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cmrcnet.atomic import write_json
from cmrcnet.errors import ConfigError
from cmrcnet.run.layout import K_CHOICE_FILE

if TYPE_CHECKING:
    from cmrcnet.data.dataset import PreparedDataset
    from cmrcnet.inference.bank import Bank
    from cmrcnet.run.load import TrainedModel

logger = logging.getLogger(__name__)

K_GRID = (5, 10, 20, 50, 100, 200, 400, 800, 1600)  # clamped to the bank size

# similarity(query_rows, bank_rows) -> (Q, B) scores where LARGER is closer
Similarity = Callable[[np.ndarray, np.ndarray], np.ndarray]


def pcc_columns(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(G,) PCC per column; 0 where the prediction is constant, NaN where the truth is constant."""
    p = pred - pred.mean(0)
    t = true - true.mean(0)
    sp, st = np.sqrt((p * p).sum(0)), np.sqrt((t * t).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / (sp * st)
    r = np.where(sp <= 1e-9, 0.0, r)
    return np.where(st <= 1e-9, np.nan, r)


def heg_columns(expr_train: np.ndarray, n: int = 50) -> np.ndarray:
    """Column indices of the n genes of highest mean over the training spots."""
    return np.argsort(-expr_train.mean(0), kind="stable")[:n]


def validation_groups(sections: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, str]:
    """Group label per training spot for leave-one-group-out, and how the groups were formed."""
    if len(np.unique(sections)) > 1:
        return sections.astype(str), "leave-one-training-section-out"
    half = np.where(coords[:, 0] <= np.median(coords[:, 0]), "left", "right")
    return half.astype(str), "two spatial halves of the single training section"


def choose_k(similarity: Similarity, expr: np.ndarray, groups: np.ndarray, *, n_extra: int = 0,
             extra_expr: np.ndarray | None = None, grid: Sequence[int] = K_GRID,
             heg: np.ndarray | None = None, chunk: int = 128) -> tuple[int, dict[int, float]]:
    """The k of `grid` with the best leave-one-group-out HEG PCC over the training spots.

    Args:
        similarity: scores between row indices (query rows, bank rows) of the training spots; bank rows >=
            len(expr) address the `n_extra` expression-only bank spots (their `extra_expr` rows).
        expr: (N, G) training expression; groups: (N,) validation group of each training spot.
        heg: columns scored (default: the HEG-50 of `expr`).
        chunk: queries ranked at a time (memory: chunk x min(max(grid), bank) x HEG floats).

    Returns:
        (k, {k: score}); ties go to the smaller k; k values above the largest bank are clamped.
    """
    heg = heg_columns(expr) if heg is None else heg
    scored = expr[:, heg] if not n_extra else np.concatenate([expr[:, heg], extra_expr[:, heg]])  # (N + E, H)
    scores: dict[int, list[float]] = {}
    for g in np.unique(groups):
        q = np.flatnonzero(groups == g)
        bank = np.concatenate([np.flatnonzero(groups != g), len(expr) + np.arange(n_extra)])
        if q.size < 3 or bank.size == 0:
            continue
        k_max = min(max(grid), bank.size)
        ks = sorted({min(k, bank.size) for k in grid})
        preds = {k: np.empty((q.size, len(heg))) for k in ks}
        for start in range(0, q.size, chunk):  # bounded memory: (chunk, k_max, H) at a time
            rows = q[start:start + chunk]
            order = np.argsort(-similarity(rows, bank), axis=1, kind="stable")[:, :k_max]  # best first
            running = np.cumsum(scored[bank[order]], axis=1)  # (chunk, k_max, H): sums over the first j
            for k in ks:
                preds[k][start:start + len(rows)] = running[:, k - 1] / k  # mean of the k nearest
        for k in ks:
            r = pcc_columns(preds[k], expr[q][:, heg])
            scores.setdefault(k, []).append(float(np.nanmean(r)) if np.isfinite(r).any() else math.nan)
    mean = {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in scores.items()}
    if not mean:
        raise ValueError("no validation group with at least 3 spots and a non-empty bank")
    best = max(sorted(mean), key=lambda k: -math.inf if math.isnan(mean[k]) else mean[k])
    return best, mean


def cosine_similarity(query_emb: np.ndarray, bank_emb: np.ndarray) -> Similarity:
    """Similarity over row indices: cosine between image embeddings (queries) and expression embeddings (bank)."""
    q = query_emb / np.linalg.norm(query_emb, axis=1, keepdims=True).clip(1e-12)
    b = bank_emb / np.linalg.norm(bank_emb, axis=1, keepdims=True).clip(1e-12)
    return lambda qi, bi: q[qi] @ b[bi].T


def euclidean_similarity(features: np.ndarray) -> Similarity:
    """Similarity over row indices: minus the Euclidean distance of features z-scored on the bank rows."""
    def sim(qi: np.ndarray, bi: np.ndarray) -> np.ndarray:
        mu, sd = features[bi].mean(0), features[bi].std(0).clip(1e-6)
        q, b = (features[qi] - mu) / sd, (features[bi] - mu) / sd
        d2 = (q * q).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * q @ b.T
        return -np.sqrt(np.maximum(d2, 0.0))
    return sim


# ---------------------------------------------------------------------- a run's k
AUTO = "auto"
FALLBACK_K = 50  # a run with retrieval.k "auto" but no choice on disk (e.g. its bank was never built)


@dataclass
class KChoice:
    """The k a run retrieves with, and the evidence it was chosen on."""

    k: int
    scores: dict[int, float]  # mean leave-one-group-out HEG PCC per k of the grid (clamped to the bank)
    how: str  # "leave-one-training-section-out" or "two spatial halves of the single training section"
    bank_samples: list[str]  # the bank the choice was made for
    bank_spots: int
    n_queries: int  # training spots that were queries

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "scores": {str(k): v for k, v in self.scores.items()}, "how": self.how,
                "bank_samples": self.bank_samples, "bank_spots": self.bank_spots, "n_queries": self.n_queries,
                "grid": list(K_GRID), "scored": "mean PCC over the 50 genes of highest mean in the training spots"}


def choose_run_k(trained: TrainedModel, bank: Bank, dataset: PreparedDataset, *, progress: bool = False) -> KChoice:
    """k for `bank` by leave-one-training-section-out over the run's training spots (module docstring).

    Queries are the bank spots of the run's training samples that have an image; every other bank spot (a sample
    added with `bank add`) is always retrievable. The training patches are embedded as in training (stain-normalised
    when the run trained so)."""
    from cmrcnet.data.spots import load_spot_table
    from cmrcnet.inference.predict import embed_patches, normalise_as_trained

    train_samples = bank_training_samples(trained, bank)
    dataset = training_dataset(trained, dataset, train_samples)
    names = set(dataset.sample_ids())
    imaged = [s for s in train_samples if s in names and dataset.has_image(s)]
    if not imaged:
        raise ConfigError(f"{trained.run_dir}: no training sample of the bank has an image in {dataset.root} to "
                          "choose k with")
    table = load_spot_table(dataset, imaged, None, img_size=trained.model_config.img_size,
                            target_sum=trained.run_config.genes.target_sum, progress=progress)
    normalise_as_trained(trained, table)
    row_of = {key: i for i, key in enumerate(bank.keys)}
    keys = table.keys()
    mine = np.array([i for i, key in enumerate(keys) if key in row_of], dtype=np.int64)
    if mine.size < 6:
        raise ConfigError(f"{trained.run_dir}: too few training spots in the bank ({mine.size}) to choose k")
    query_rows = np.array([row_of[keys[i]] for i in mine], dtype=np.int64)
    extra_rows = np.setdiff1d(np.arange(len(bank)), query_rows)
    img = embed_patches(trained, table.images[mine], progress=progress).numpy()
    emb = bank.embeddings.numpy()
    expr = bank.expression.numpy().astype(np.float64)
    groups, how = validation_groups(np.asarray(table.sample_ids)[mine], np.asarray(table.coords)[mine])
    try:
        k, scores = choose_k(cosine_similarity(img, np.concatenate([emb[query_rows], emb[extra_rows]])),
                             expr[query_rows], groups, n_extra=len(extra_rows), extra_expr=expr[extra_rows])
    except ValueError as exc:  # no validation group large enough
        raise ConfigError(f"{trained.run_dir}: cannot choose k by {how}: {exc}") from exc
    return KChoice(k, scores, how, list(bank.samples), len(bank), int(mine.size))


def bank_training_samples(trained: TrainedModel, bank: Bank) -> list[str]:
    """The run's training samples that are in `bank` (in training order): the queries of the k choice and the
    samples whose validation spots the confidence reference leaves out in turn."""
    return [s for s in trained.run_info.get("train_samples", []) if s in bank.samples]


def training_dataset(trained: TrainedModel, dataset: PreparedDataset, samples: list[str]) -> PreparedDataset:
    """`dataset`, or the run's training dataset (run.json "data_dir") when `dataset` lacks training samples (e.g.
    expression-only sections prepared into a folder of their own for `bank add`)."""
    from cmrcnet.data.dataset import PreparedDataset

    if set(samples) <= set(dataset.sample_ids()):
        return dataset
    own = trained.run_info.get("data_dir")
    if own and Path(own).is_dir():
        return PreparedDataset(own)
    return dataset


def update_run_k(trained: TrainedModel, bank: Bank, dataset: PreparedDataset, *, progress: bool = False,
                 fallback: bool = False) -> int:
    """Choose k for the run's (new) bank when its config says ``retrieval.k: auto``, write retrieval_k.json and log
    the choice; returns the k the run now retrieves with. Where k cannot be chosen (too few training spots, no
    training patches) a ConfigError, or with `fallback` k = 50 written with the reason and a warning."""
    if trained.run_config.retrieval.k != AUTO:
        return int(trained.run_config.retrieval.k)
    try:
        choice = choose_run_k(trained, bank, dataset, progress=progress)
    except ConfigError as exc:
        if not fallback:
            raise
        logger.warning("retrieval k = %d: %s", FALLBACK_K, exc)
        choice = KChoice(FALLBACK_K, {}, f"not chosen ({exc})", list(bank.samples), len(bank), 0)
    write_json(Path(trained.run_dir) / K_CHOICE_FILE, choice.to_json())
    if choice.scores:
        logger.info("retrieval k = %d, chosen by %s over %d training spots for a bank of %d spots (scores: %s)",
                    choice.k, choice.how, choice.n_queries, choice.bank_spots,
                    ", ".join(f"{k}: {v:.3f}" for k, v in sorted(choice.scores.items())))
    return choice.k


def resolve_k(trained: TrainedModel, bank: Bank | None = None, k: int | None = None) -> int:
    """The k to retrieve with: `k` when given, else the run's fixed ``retrieval.k``, else (``auto``) the k chosen
    for its bank (retrieval_k.json; a warning when the bank has changed since, or 50 when nothing was chosen)."""
    if k is not None:
        return int(k)
    fixed = trained.run_config.retrieval.k
    if fixed != AUTO:
        return int(fixed)
    path = Path(trained.run_dir) / K_CHOICE_FILE
    if not path.is_file():
        logger.warning("%s: retrieval k is 'auto' but no k was chosen (%s missing): using k = %d",
                       trained.run_dir, K_CHOICE_FILE, FALLBACK_K)
        return FALLBACK_K
    choice = json.loads(path.read_text())
    if bank is not None and (sorted(choice.get("bank_samples", [])) != sorted(bank.samples)
                             or choice.get("bank_spots") != len(bank)):
        logger.warning("%s: k = %d was chosen for a bank of %s; the bank now holds %s (rebuild it with `cmrcnet "
                       "bank build/add` to choose k again)", trained.run_dir, choice["k"],
                       choice.get("bank_samples"), bank.samples)
    return int(choice["k"])
