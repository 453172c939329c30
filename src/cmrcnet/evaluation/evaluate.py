"""`cmrcnet evaluate`: score a prediction file (PRED.h5ad) against the measured expression of a prepared dataset.

Protocol (EVALUATION.md):

- Normalisation: the measured counts of each test sample are library-size normalised to the prediction's
  `target_sum` and log1p'd (`expression_matrix`, library size over all genes of the spot), restricted to the
  predicted genes, spots aligned to the prediction by barcode. Predicted genes absent from a measured sample
  are reported and left out of that sample's metrics.
- Gene sets: `heg<n>` (highest mean log1p expression over all pooled spots), `hvg<n>` (highest Seurat-v1
  normalised dispersion, `cmrcnet.data.genes.normalized_dispersion` with the gene-selection default
  `n_bins`, the score that chose the model's genes; genes without a finite score are never selected; the
  dispersion bins are formed among the predicted genes, so the ranking can differ slightly from the one over
  the whole transcriptome), `markers` (the requested markers that are predicted) and `all`.
  strict (default): HEG/HVG are chosen on the TRAINING samples of the model (uns["cmrcnet"]["train_samples"])
  minus any evaluated sample; the evaluated samples' counts are never read for this. paper: chosen on each test
  sample's own measurements (CMRCNet's protocol, leaks; labelled "paper protocol" in every output).
- PCC: per gene within each test sample, mean over genes, then mean (and sample standard deviation, ddof=1)
  over test samples; never pooled across slides. A gene constant on a sample's measured data (population std
  <= 1e-6) is excluded from that sample's means and counted; a gene constant only in the prediction scores 0 in
  the headline (`pcc_<set>`), and the mean that excludes it too is reported alongside
  (`pcc_<set>_excl_constant`).
- NaN in the written JSON (and the returned dict) is null.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from cmrcnet import __version__
from cmrcnet.atomic import atomic_path, write_json, write_text
from cmrcnet.constants import CMRCNET_UNS, SAMPLE_KEY, SPATIAL_KEY
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.genes import GeneSelectionConfig, expression_matrix, normalized_dispersion
from cmrcnet.data.hdf5 import probe_hdf5
from cmrcnet.data.markers import default_markers
from cmrcnet.data.sample import check_sparse
from cmrcnet.errors import ConfigError, InputFileError, require_file
from cmrcnet.evaluation.metrics import DEFAULT_EPS, evaluate_arrays, top_expressed_genes
from cmrcnet.reports import REPORT_FILE, evaluation_report

logger = logging.getLogger(__name__)

Protocol = Literal["strict", "paper"]

BARCODE_KEY = "barcode"  # obs of PRED.h5ad: spot barcode within its sample
PCC_POOLING = "per gene within each test sample, mean over genes, then mean over samples"
CONSTANT_RULE = (
    f"a gene constant in a test sample's measured data (population std <= {DEFAULT_EPS:g}) has no PCC and is "
    "excluded from that sample's means and counted; a gene constant only in the prediction scores PCC 0 in the "
    "headline (pcc_<set>) and is excluded in pcc_<set>_excl_constant, reported alongside"
)
PROTOCOL_LABEL = {"strict": "strict protocol", "paper": "paper protocol"}
PROTOCOLS = tuple(PROTOCOL_LABEL)  # "strict" (default) or "paper"
PROTOCOL_NOTE = {
    "strict": "HEG/HVG chosen on the model's training samples only; test samples are never read for selection",
    "paper": (
        "paper protocol (CMRCNet's): HEG/HVG chosen on each test sample's own measured expression; this looks "
        "at the test data and inflates scores; for reproducing the paper only"
    ),
}
SYNTHETIC_NOTE = "SYNTHETIC data: not biological; numbers only check that the pipeline works"
HVG_N_BINS = (
    GeneSelectionConfig().n_bins
)  # the same binning as the gene selection that chose the model's genes
N_MAP_GENES = 3  # genes per best/median/worst map
MAX_MARKER_MAPS = 12  # marker genes drawn at most
OVERALL_METRICS = ("mse", "mae", "spotwise_pcc", "gene_gene_corr", "n_constant_excluded")


# --- reading the prediction -------------------------------------------------------------------------------
TRANSDUCTIVE_NOTE = (
    "TRANSDUCTIVE: the model's image encoder was pretrained with test slides included (--include-test-slides)"
)


def _plain(value: Any) -> Any:
    """numpy scalars/arrays from an h5ad `uns` -> plain Python (lists, floats, bools, str)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


IN_MEMORY = Path("<prediction in memory>")  # what messages name for a prediction given as an AnnData


def read_prediction(pred_path: str | Path | ad.AnnData) -> tuple[ad.AnnData, dict[str, Any]]:
    """Read and check a PRED.h5ad (or check a prediction AnnData in memory); return it and its provenance
    (uns["cmrcnet"]) as plain Python."""
    if isinstance(pred_path, ad.AnnData):
        pred, path = pred_path, IN_MEMORY
    else:
        path = require_file(pred_path, "prediction file")
        probe_hdf5(path, "prediction file")
        try:
            pred = ad.read_h5ad(path)
        except Exception as exc:  # h5py/anndata raise OSError, KeyError, ValueError on corrupt files
            raise InputFileError(
                f"cannot read prediction h5ad ({type(exc).__name__}: {exc})", path=path
            ) from exc
    info = pred.uns.get(CMRCNET_UNS)
    if not isinstance(info, dict):
        raise InputFileError(
            f'not a cmrcnet prediction: no uns["{CMRCNET_UNS}"] (write it with `cmrcnet predict`)', path=path
        )
    info = _plain(info)
    for key in (SAMPLE_KEY, BARCODE_KEY):
        if key not in pred.obs:
            raise InputFileError(f'no obs["{key}"] column', path=path)
    if "target_sum" not in info:
        raise InputFileError(f'uns["{CMRCNET_UNS}"] has no "target_sum"', path=path)
    try:
        target_sum = float(info["target_sum"])
    except (TypeError, ValueError) as exc:
        raise InputFileError(f"target_sum is not a number: {info['target_sum']!r}", path=path) from exc
    if not target_sum > 0:
        raise InputFileError(f"target_sum must be positive, got {target_sum}", path=path)
    info["target_sum"] = target_sum
    train = info.get("train_samples", [])
    info["train_samples"] = [str(train)] if isinstance(train, str) else [str(s) for s in train]
    if pred.n_obs == 0 or pred.n_vars == 0:
        raise InputFileError(f"empty prediction ({pred.n_obs} spots x {pred.n_vars} genes)", path=path)
    if not pred.var_names.is_unique:
        raise InputFileError("duplicated gene names in the prediction", path=path)
    check_sparse(pred.X, path=path, what="prediction matrix")
    x = _dense(pred.X)
    if not np.isfinite(x).all():
        raise InputFileError(
            f"{int((~np.isfinite(x)).sum())} predicted values are NaN or infinite", path=path
        )
    return pred, info


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


# --- gene-set selection -------------------------------------------------------------------------------------
def top_dispersion_genes(log_expr: np.ndarray, gene_names: Sequence[str], *, n: int) -> list[str]:
    """The `n` genes with the highest Seurat-v1 normalised dispersion (genes.normalized_dispersion), highest first.

    Genes with no finite dispersion (never expressed, constant) are not selected, so fewer than `n` may come
    back. Ties keep the order of `gene_names`.
    """
    names = [str(g) for g in gene_names]
    score = normalized_dispersion(np.asarray(log_expr), n_bins=HVG_N_BINS)  # (G,)
    ok = np.isfinite(score)
    order = np.argsort(np.where(ok, -score, np.inf), kind="stable")
    return [names[i] for i in order[: min(n, int(ok.sum()))]]


def _select(log_expr: np.ndarray, genes: list[str], n_top: int) -> tuple[list[str], list[str]]:
    """(HEG, HVG) of `genes` on the given spots."""
    return top_expressed_genes(log_expr, genes, n=n_top), top_dispersion_genes(log_expr, genes, n=n_top)


def _training_selection(
    dataset: PreparedDataset, samples: list[str], genes: list[str], target_sum: float, n_top: int
) -> tuple[list[str], list[str], list[str]]:
    """(HEG, HVG, genes left out because absent from a training sample), computed on the training samples only."""
    absent = [s for s in samples if s not in set(dataset.sample_ids())]
    if absent:
        raise InputFileError(
            f"the strict protocol chooses HEG/HVG on the model's training samples, but {absent} are not in this "
            "dataset; evaluate against the prepared dataset the model was trained on",
            path=dataset.root,
        )
    mats, missing_any = [], set()
    for sid in samples:
        counts = dataset.read_counts(sid)
        mat, missing = expression_matrix(
            counts, genes, target_sum=target_sum, allow_missing=True, source=dataset.counts_path(sid)
        )
        mats.append(mat)  # (N_sid, G)
        missing_any |= set(missing)
    keep = [i for i, g in enumerate(genes) if g not in missing_any]
    if missing_any:
        logger.warning(
            "%d predicted genes are missing from some training samples and cannot be HEG/HVG: %s",
            len(missing_any),
            sorted(missing_any)[:10],
        )
    if not keep:
        raise InputFileError("no predicted gene is present in every training sample", path=dataset.root)
    pooled = np.concatenate(mats)[:, keep]  # (sum N, G_kept)
    heg, hvg = _select(pooled, [genes[i] for i in keep], n_top)
    return heg, hvg, sorted(missing_any)


# --- one test sample ----------------------------------------------------------------------------------------
def _measured_for(
    dataset: PreparedDataset,
    sid: str,
    barcodes: list[str],
    genes: list[str],
    target_sum: float,
    pred_path: Path,
) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """Measured log1p (N, G) aligned to `barcodes`, the predicted genes missing from the sample, extra info."""
    counts = dataset.read_counts(sid)
    present = pd.Index(counts.obs_names)
    absent = [b for b in barcodes if b not in present]
    if absent:
        raise InputFileError(
            f"{len(absent)} of {len(barcodes)} predicted spots of sample {sid!r} are not in the measured data "
            f"of {dataset.counts_path(sid)} (first: {absent[:5]}); was the prediction made on another version "
            "of this sample?",
            path=pred_path,
        )
    n_measured = int(counts.n_obs)
    counts = counts[barcodes]
    mat, missing = expression_matrix(
        counts, genes, target_sum=target_sum, allow_missing=True, source=dataset.counts_path(sid)
    )
    if missing:
        logger.warning(
            "sample %s: %d predicted genes are not measured and are left out of its metrics: %s",
            sid,
            len(missing),
            missing[:10],
        )
    extra = {"n_spots_measured": n_measured, "n_measured_spots_not_predicted": n_measured - len(barcodes)}
    return mat, missing, extra


def _safe_name(sid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sid) or "sample"


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_clean(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _mean_std(values: list[float]) -> dict[str, Any]:
    v = np.array([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    return {
        "mean": float(v.mean()) if v.size else None,
        "std": float(v.std(ddof=1)) if v.size > 1 else None,
        "n_samples_used": int(v.size),
    }


# --- the whole evaluation -----------------------------------------------------------------------------------
def evaluate_predictions(
    pred_path: str | Path | ad.AnnData,
    data_dir: str | Path,
    out_dir: str | Path | None,
    *,
    markers: list[str] | None = None,
    protocol: Protocol = "strict",
    n_top: int = 50,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate PRED.h5ad against the measured counts in the prepared dataset `data_dir`; write reports.

    Args:
        pred_path: the prediction file written by `cmrcnet predict`, or the AnnData `cmrcnet.predict` returns.
        data_dir: the prepared dataset holding the measured counts of the predicted samples (and, in strict
            mode, of the model's training samples).
        out_dir: created if needed; receives metrics.json, genes.csv, summary.md and (with `plots`) PNGs.
            None: nothing is written (the metrics are returned).
        markers: marker genes; None picks `default_markers` for the predicted panel.
        protocol: "strict" (HEG/HVG from training samples) or "paper" (from each test sample, labelled).
        n_top: size of the HEG and HVG sets (set names `heg<n_top>`, `hvg<n_top>`).
        plots: write expression maps and the PCC histogram.

    Returns:
        The metrics dict written to metrics.json (NaN as None).
    """
    if protocol not in PROTOCOL_LABEL:
        raise ConfigError(f"protocol must be 'strict' or 'paper', got {protocol!r}")
    if isinstance(n_top, bool) or not isinstance(n_top, int) or n_top < 1:
        raise ConfigError(f"n_top must be a positive integer, got {n_top!r}")
    pred, info = read_prediction(pred_path)
    in_memory = isinstance(pred_path, ad.AnnData)
    pred_path = IN_MEMORY if in_memory else Path(pred_path)
    dataset = PreparedDataset(data_dir)
    label = PROTOCOL_LABEL[protocol]
    synthetic = bool(info.get("synthetic", False))
    genes = [str(g) for g in pred.var_names]
    heg_name, hvg_name = f"heg{n_top}", f"hvg{n_top}"

    sample_of = pred.obs[SAMPLE_KEY].astype(str).to_numpy()
    barcode_of = pred.obs[BARCODE_KEY].astype(str).to_numpy()
    test_samples = list(dict.fromkeys(sample_of.tolist()))
    dataset.require(test_samples)
    x_pred = _dense(pred.X).astype(np.float32)  # (N, G)
    coords = np.asarray(pred.obsm[SPATIAL_KEY], dtype=np.float64) if SPATIAL_KEY in pred.obsm else None

    # leakage checks: the model's training samples and patients vs the evaluated ones
    train_samples = info["train_samples"]
    in_training = [s for s in test_samples if s in set(train_samples)]
    notes: list[str] = []
    if in_training:
        msg = f"evaluated samples {in_training} are training samples of this model: their scores are not test scores"
        logger.warning(msg)
        notes.append(msg)
    bank = info.get("bank_samples") or []
    in_bank = [s for s in test_samples if s in {str(b) for b in bank}]
    if in_bank:
        msg = f"evaluated samples {in_bank} are in the retrieval bank: their own expression can be retrieved"
        logger.warning(msg)
        notes.append(msg)
    known = set(dataset.sample_ids())
    train_patients = {dataset.patient(s) for s in train_samples if s in known}
    shared_patients = {s: dataset.patient(s) for s in test_samples if dataset.patient(s) in train_patients}
    shared_patients = {s: p for s, p in shared_patients.items() if s not in in_training}
    if shared_patients:
        msg = f"evaluated samples share a patient with the training samples: {shared_patients}"
        logger.warning(msg)
        notes.append(msg)
    if str(info.get("gene_mode", "")) == "paper":
        notes.append(
            "the model's gene list was chosen in paper mode (union of per-slide HVGs over all slides, "
            "test slides included)"
        )

    # marker set: fixed in advance, never looks at any slide
    marker_list = list(dict.fromkeys(markers if markers is not None else default_markers(genes)))
    marker_genes = [g for g in marker_list if g in set(genes)]
    markers_not_predicted = [g for g in marker_list if g not in set(genes)]
    if markers_not_predicted:
        logger.info("marker genes not predicted by the model: %s", markers_not_predicted)
    if not marker_genes:
        logger.warning("none of the %d marker genes is predicted; the marker set is empty", len(marker_list))

    # HEG/HVG: strict from training samples (never the test samples), paper from each test sample
    selection_missing: list[str] = []
    if protocol == "strict":
        selection_samples = [s for s in train_samples if s not in set(test_samples)]
        if not selection_samples:
            raise ConfigError(
                "strict protocol needs the model's training samples to choose HEG/HVG, but the prediction lists "
                f"none outside the evaluated samples (train_samples={train_samples}); use --protocol paper "
                "only to reproduce the paper"
            )
        heg, hvg, selection_missing = _training_selection(
            dataset, selection_samples, genes, info["target_sum"], n_top
        )
        logger.info("strict protocol: HEG/HVG chosen on training samples %s", selection_samples)
    else:
        logger.warning("paper protocol: HEG/HVG are chosen on each test sample's own measurements (leaks)")

    per_sample: dict[str, dict[str, Any]] = {}
    per_gene_frames: list[pd.DataFrame] = []
    sets_per_sample: dict[str, dict[str, list[str]]] = {}
    plot_inputs: dict[str, tuple] = {}
    for sid in test_samples:
        rows = np.flatnonzero(sample_of == sid)
        barcodes = barcode_of[rows].tolist()
        if len(set(barcodes)) != len(barcodes):
            raise InputFileError(f"duplicated barcodes for sample {sid!r}", path=pred_path)
        true_full, missing, extra = _measured_for(
            dataset, sid, barcodes, genes, info["target_sum"], pred_path
        )
        cols = [j for j, g in enumerate(genes) if g not in set(missing)]
        present = [genes[j] for j in cols]
        true = true_full[:, cols]  # (n, G_present)
        predicted = x_pred[rows][:, cols]  # (n, G_present)
        if protocol == "paper":
            s_heg, s_hvg = _select(true, present, n_top)
        else:
            s_heg, s_hvg = heg, hvg
        sets = {heg_name: s_heg, hvg_name: s_hvg, "markers": marker_genes, "all": genes}
        sets_per_sample[sid] = sets
        res = evaluate_arrays(predicted, true, present, gene_sets=sets)
        frame = res.pop("per_gene")
        frame.insert(0, "sample_id", sid)
        for name in (heg_name, hvg_name, "markers"):
            frame[f"in_{name}"] = frame["gene"].isin(sets[name])
        frame["protocol"] = label
        per_gene_frames.append(frame)
        per_sample[sid] = {**res, "missing_genes": missing, **extra}
        if plots:
            xy = (
                coords[rows]
                if coords is not None
                else np.asarray(dataset.read_counts(sid)[barcodes].obsm[SPATIAL_KEY])
            )
            plot_inputs[sid] = (xy, predicted, true, present, frame)

    set_names = [heg_name, hvg_name, "markers", "all"]
    overall: dict[str, Any] = {"n_samples": len(test_samples), "std_ddof": 1}
    for name in set_names:
        overall[f"pcc_{name}"] = _mean_std(
            [per_sample[s]["gene_sets"][name]["mean_pcc"] for s in test_samples]
        )
        overall[f"pcc_{name}_excl_constant"] = _mean_std(
            [per_sample[s]["gene_sets"][name]["mean_pcc_excl_constant"] for s in test_samples]
        )
    for key in OVERALL_METRICS:
        overall[key] = _mean_std([float(per_sample[s][key]) for s in test_samples])
    overall["n_constant_excluded_per_sample"] = {
        s: per_sample[s]["n_constant_excluded"] for s in test_samples
    }

    if protocol == "strict":
        rule_heg = f"top {n_top} by mean log1p expression over the pooled spots of the training samples"
        rule_hvg = (
            f"top {n_top} by Seurat-v1 normalised dispersion over the pooled spots of the training samples"
        )
        selected_on: Any = selection_samples
    else:
        rule_heg = (
            f"top {n_top} by mean log1p expression on each test sample's own measurements (paper protocol)"
        )
        rule_hvg = f"top {n_top} by Seurat-v1 normalised dispersion on each test sample (paper protocol)"
        selected_on = "each test sample (paper protocol)"
    gene_sets: dict[str, Any] = {
        heg_name: {
            "rule": rule_heg,
            "selected_on": selected_on,
            "genes": heg if protocol == "strict" else None,
            "genes_per_sample": {s: sets_per_sample[s][heg_name] for s in test_samples},
        },
        hvg_name: {
            "rule": rule_hvg,
            "hvg_n_bins": HVG_N_BINS,
            "selected_on": selected_on,
            "genes": hvg if protocol == "strict" else None,
            "genes_per_sample": {s: sets_per_sample[s][hvg_name] for s in test_samples},
        },
        "markers": {
            "rule": "given marker list" if markers is not None else "default marker list",
            "selected_on": "none (fixed in advance)",
            "genes": marker_genes,
            "not_predicted": markers_not_predicted,
        },
        "all": {"rule": "every predicted gene", "selected_on": "none", "genes": genes},
    }
    if selection_missing:
        gene_sets[heg_name]["not_in_training_samples"] = selection_missing
        gene_sets[hvg_name]["not_in_training_samples"] = selection_missing

    metrics: dict[str, Any] = {
        "protocol": label,
        "protocol_id": protocol,
        "protocol_note": PROTOCOL_NOTE[protocol],
        "pcc_pooling": PCC_POOLING,
        "constant_gene_rule": CONSTANT_RULE,
        "normalisation": f"library size scaled to target_sum={info['target_sum']:g}, then log1p",
        "synthetic": synthetic,
        "synthetic_note": SYNTHETIC_NOTE if synthetic else None,
        "prediction": {
            "path": None if in_memory else str(pred_path.resolve()),
            **{
                k: info.get(k)
                for k in (
                    "method",
                    "run_dir",
                    "train_samples",
                    "bank_samples",
                    "target_sum",
                    "gene_mode",
                    "k",
                    "weighting",
                    "transductive",
                )
            },
            "n_spots": int(pred.n_obs),
            "n_genes": int(pred.n_vars),
        },
        "data_dir": str(dataset.root.resolve()),
        "test_samples": test_samples,
        "leakage": {
            "test_samples_in_training": in_training,
            "test_samples_in_bank": in_bank,
            "test_samples_sharing_training_patient": shared_patients,
            "notes": notes,
        },
        "gene_sets": gene_sets,
        "per_sample": per_sample,
        "overall": overall,
        "cmrcnet_version": __version__,
    }
    metrics = _clean(metrics)
    if out_dir is None:
        return metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ["metrics.json", "genes.csv", "summary.md"]
    genes_df = pd.concat(per_gene_frames, ignore_index=True)
    if plots:
        files += _write_plots(out_dir, dataset, plot_inputs, metrics, set_names, label, synthetic)
    with atomic_path(out_dir / "genes.csv") as tmp:
        genes_df.to_csv(tmp, index=False)
    write_text(out_dir / "summary.md", _summary_markdown(metrics, set_names))
    metrics["files"] = [*files, REPORT_FILE]
    evaluation_report(out_dir, metrics, set_names, files)
    write_json(out_dir / "metrics.json", metrics)
    logger.info("evaluation (%s) written to %s", label, out_dir)
    return metrics


# --- reports ------------------------------------------------------------------------------------------------
def _title(text: str, label: str, synthetic: bool) -> str:
    return f"{text} [{label}]" + (" - SYNTHETIC data" if synthetic else "")


def _write_plots(
    out_dir: Path,
    dataset: PreparedDataset,
    plot_inputs: dict[str, tuple],
    metrics: dict[str, Any],
    set_names: list[str],
    label: str,
    synthetic: bool,
) -> list[str]:
    from cmrcnet.plotting.maps import plot_expression_maps, plot_pcc_distribution

    written: list[str] = []
    frames = []
    for sid, (xy, predicted, true, present, frame) in plot_inputs.items():
        frames.append(frame)
        thumb = dataset.thumbnail(sid)
        img, scale = thumb if thumb is not None else (None, None)
        pcc = frame["pcc"].to_numpy(dtype=np.float64)
        finite = np.flatnonzero(np.isfinite(pcc))
        ranked = finite[np.argsort(-pcc[finite], kind="stable")]  # best first
        groups: dict[str, np.ndarray] = {}
        if ranked.size:
            k = min(N_MAP_GENES, ranked.size)
            mid = max(0, ranked.size // 2 - k // 2)
            groups = {"best": ranked[:k], "median": ranked[mid : mid + k], "worst": ranked[::-1][:k]}
        marker_idx = [present.index(g) for g in metrics["gene_sets"]["markers"]["genes"] if g in present]
        if marker_idx:
            groups["markers"] = np.array(marker_idx[:MAX_MARKER_MAPS])
        for group, idx in groups.items():
            name = f"maps_{_safe_name(sid)}_{group}.png"
            plot_expression_maps(
                img,
                scale,
                xy,
                true[:, idx],
                predicted[:, idx],
                [present[i] for i in idx],
                pcc[idx].tolist(),
                out_dir / name,
                title=_title(
                    f"{sid}: {group} genes by PCC" if group != "markers" else f"{sid}: marker genes",
                    label,
                    synthetic,
                ),
            )
            written.append(name)
    if frames:
        overall = metrics["overall"]["pcc_all"]["mean"]
        mean_text = "n/a" if overall is None else f"{overall:.3f}"
        plot_pcc_distribution(
            pd.concat(frames, ignore_index=True),
            out_dir / "pcc_distribution.png",
            title=_title(f"per-gene PCC, all genes (mean over samples {mean_text})", label, synthetic),
        )
        written.append("pcc_distribution.png")
    return written


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return str(v)
    return f"{v:.{digits}f}"


def _summary_markdown(m: dict[str, Any], set_names: list[str]) -> str:
    lines = [f"# cmrcnet evaluation ({m['protocol']})", ""]
    if m["protocol_id"] == "paper":
        lines += [f"**{m['protocol_note']}**", ""]
    if m["synthetic"]:
        lines += [f"**{m['synthetic_note']}**", ""]
    if m["prediction"].get("transductive"):
        lines += [f"**{TRANSDUCTIVE_NOTE}**", ""]
    lines += [
        f"- prediction: `{m['prediction']['path']}` (method {m['prediction'].get('method')})",
        f"- protocol: {m['protocol']}; HEG/HVG selected on: {m['gene_sets'][set_names[0]]['selected_on']}",
        f"- PCC: {m['pcc_pooling']}; {m['constant_gene_rule']}",
        f"- marker genes evaluated: {', '.join(m['gene_sets']['markers']['genes']) or 'none'}",
    ]
    for note in m["leakage"]["notes"]:
        lines.append(f"- WARNING: {note}")
    lines.append("")
    header = [
        "sample",
        *(f"PCC {s}" for s in set_names),
        "MSE",
        "MAE",
        "spot PCC",
        "gene-gene r",
        "constant genes (data / prediction)",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for sid, r in m["per_sample"].items():
        cells = [sid, *(_fmt(r["gene_sets"][s]["mean_pcc"]) for s in set_names)]
        cells += [_fmt(r["mse"]), _fmt(r["mae"]), _fmt(r["spotwise_pcc"]), _fmt(r["gene_gene_corr"])]
        cells.append(f"{r['n_constant_true']} / {r['n_constant_pred']}")
        lines.append("| " + " | ".join(cells) + " |")
    o = m["overall"]

    def ms(d: dict[str, Any]) -> str:
        return _fmt(d["mean"]) + ("" if d["std"] is None else f" ± {_fmt(d['std'])}")

    cells = [
        f"mean ± sd ({o['n_samples']} sample{'s' if o['n_samples'] != 1 else ''})",
        *(ms(o[f"pcc_{s}"]) for s in set_names),
    ]
    cells += [ms(o[k]) for k in ("mse", "mae", "spotwise_pcc", "gene_gene_corr", "n_constant_excluded")]
    lines += ["| " + " | ".join(cells) + " |", ""]
    lines.append(f"Protocol: {m['protocol']}. {m['protocol_note']}.")
    return "\n".join(lines) + "\n"
