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
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd

from cmrcnet import __version__
from cmrcnet.atomic import atomic_path, write_json, write_text
from cmrcnet.constants import SAMPLE_KEY, SPATIAL_KEY
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.markers import default_markers
from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.evaluation.eval_outputs import TRANSDUCTIVE_NOTE, summary_markdown, write_plots
from cmrcnet.evaluation.gene_sets import HVG_N_BINS, select_heg_hvg, top_dispersion_genes, training_selection
from cmrcnet.evaluation.metrics import DEFAULT_EPS, evaluate_arrays
from cmrcnet.evaluation.reading import BARCODE_KEY, IN_MEMORY, dense, measured_for, read_prediction
from cmrcnet.reports import REPORT_FILE, evaluation_report

__all__ = [
    "BARCODE_KEY",
    "CONSTANT_RULE",
    "HVG_N_BINS",
    "IN_MEMORY",
    "OVERALL_METRICS",
    "PCC_POOLING",
    "PROTOCOLS",
    "PROTOCOL_LABEL",
    "PROTOCOL_NOTE",
    "SYNTHETIC_NOTE",
    "TRANSDUCTIVE_NOTE",
    "evaluate_predictions",
    "read_prediction",
    "top_dispersion_genes",
]

logger = logging.getLogger(__name__)

Protocol = Literal["strict", "paper"]

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
OVERALL_METRICS = ("mse", "mae", "spotwise_pcc", "gene_gene_corr", "n_constant_excluded")


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
    _check_options(protocol, n_top)
    pred, info = read_prediction(pred_path)
    in_memory = isinstance(pred_path, ad.AnnData)
    pred_path = IN_MEMORY if in_memory else Path(pred_path)
    dataset = PreparedDataset(data_dir)
    genes = [str(g) for g in pred.var_names]
    test_samples = list(dict.fromkeys(pred.obs[SAMPLE_KEY].astype(str).tolist()))
    dataset.require(test_samples)
    leakage = _leakage(info, test_samples, dataset)
    marker_genes, markers_not_predicted = _marker_set(markers, genes)
    selection = _strict_selection(dataset, info, test_samples, genes, n_top) if protocol == "strict" else None
    if selection is None:
        logger.warning("paper protocol: HEG/HVG are chosen on each test sample's own measurements (leaks)")
    scored = _score_samples(
        pred, pred_path, dataset, info, test_samples, marker_genes, selection, n_top=n_top, protocol=protocol
    )
    set_names = [f"heg{n_top}", f"hvg{n_top}", "markers", "all"]
    gene_sets = _gene_set_records(
        selection, scored, genes, marker_genes, markers_not_predicted, n_top=n_top, given_markers=markers
    )
    metrics = _clean(
        _metrics_record(
            pred,
            None if in_memory else pred_path,
            info,
            dataset,
            test_samples,
            protocol=protocol,
            leakage=leakage,
            gene_sets=gene_sets,
            per_sample=scored.per_sample,
            overall=_overall(scored.per_sample, test_samples, set_names),
        )
    )
    if out_dir is not None:
        _write_outputs(Path(out_dir), dataset, metrics, scored, set_names, plots=plots)
    return metrics


class _Scored:
    """Per test sample: the metrics, the per-gene table, the gene sets used and (for plots) the arrays."""

    def __init__(self) -> None:
        self.per_sample: dict[str, dict[str, Any]] = {}
        self.per_gene_frames: list[pd.DataFrame] = []
        self.sets_per_sample: dict[str, dict[str, list[str]]] = {}
        self.plot_inputs: dict[str, tuple] = {}


def _check_options(protocol: str, n_top: int) -> None:
    if protocol not in PROTOCOL_LABEL:
        raise ConfigError(f"protocol must be 'strict' or 'paper', got {protocol!r}")
    if isinstance(n_top, bool) or not isinstance(n_top, int) or n_top < 1:
        raise ConfigError(f"n_top must be a positive integer, got {n_top!r}")


def _leakage(info: dict[str, Any], test_samples: list[str], dataset: PreparedDataset) -> dict[str, Any]:
    """Evaluated samples that trained the model, sit in its bank or share a patient with training; notes."""
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
    return {
        "test_samples_in_training": in_training,
        "test_samples_in_bank": in_bank,
        "test_samples_sharing_training_patient": shared_patients,
        "notes": notes,
    }


def _marker_set(markers: list[str] | None, genes: list[str]) -> tuple[list[str], list[str]]:
    """(marker genes the model predicts, markers it does not): fixed in advance, never looks at any slide."""
    marker_list = list(dict.fromkeys(markers if markers is not None else default_markers(genes)))
    marker_genes = [g for g in marker_list if g in set(genes)]
    markers_not_predicted = [g for g in marker_list if g not in set(genes)]
    if markers_not_predicted:
        logger.info("marker genes not predicted by the model: %s", markers_not_predicted)
    if not marker_genes:
        logger.warning("none of the %d marker genes is predicted; the marker set is empty", len(marker_list))
    return marker_genes, markers_not_predicted


def _strict_selection(
    dataset: PreparedDataset, info: dict[str, Any], test_samples: list[str], genes: list[str], n_top: int
) -> dict[str, Any]:
    """HEG and HVG chosen on the model's training samples (never the test samples), and what was left out."""
    train_samples = info["train_samples"]
    selection_samples = [s for s in train_samples if s not in set(test_samples)]
    if not selection_samples:
        raise ConfigError(
            "strict protocol needs the model's training samples to choose HEG/HVG, but the prediction lists "
            f"none outside the evaluated samples (train_samples={train_samples}); use protocol='paper' "
            "only to reproduce the paper"
        )
    heg, hvg, missing = training_selection(dataset, selection_samples, genes, info["target_sum"], n_top)
    logger.info("strict protocol: HEG/HVG chosen on training samples %s", selection_samples)
    return {"heg": heg, "hvg": hvg, "missing": missing, "samples": selection_samples}


def _score_samples(
    pred: ad.AnnData,
    pred_path: Path,
    dataset: PreparedDataset,
    info: dict[str, Any],
    test_samples: list[str],
    marker_genes: list[str],
    selection: dict[str, Any] | None,
    *,
    n_top: int,
    protocol: str,
) -> _Scored:
    """Every test sample's metrics over its gene sets, on the genes it measures."""
    genes = [str(g) for g in pred.var_names]
    heg_name, hvg_name = f"heg{n_top}", f"hvg{n_top}"
    sample_of = pred.obs[SAMPLE_KEY].astype(str).to_numpy()
    barcode_of = pred.obs[BARCODE_KEY].astype(str).to_numpy()
    x_pred = dense(pred.X).astype(np.float32)  # (N, G)
    coords = np.asarray(pred.obsm[SPATIAL_KEY], dtype=np.float64) if SPATIAL_KEY in pred.obsm else None
    scored = _Scored()
    for sid in test_samples:
        rows = np.flatnonzero(sample_of == sid)
        barcodes = barcode_of[rows].tolist()
        if len(set(barcodes)) != len(barcodes):
            raise InputFileError(f"duplicated barcodes for sample {sid!r}", path=pred_path)
        true_full, missing, extra = measured_for(dataset, sid, barcodes, genes, info["target_sum"], pred_path)
        cols = [j for j, g in enumerate(genes) if g not in set(missing)]
        present = [genes[j] for j in cols]
        true = true_full[:, cols]  # (n, G_present)
        predicted = x_pred[rows][:, cols]  # (n, G_present)
        if selection is None:
            s_heg, s_hvg = select_heg_hvg(true, present, n_top)
        else:
            s_heg, s_hvg = selection["heg"], selection["hvg"]
        sets = {heg_name: s_heg, hvg_name: s_hvg, "markers": marker_genes, "all": genes}
        scored.sets_per_sample[sid] = sets
        res = evaluate_arrays(predicted, true, present, gene_sets=sets)
        frame = res.pop("per_gene")
        frame.insert(0, "sample_id", sid)
        for name in (heg_name, hvg_name, "markers"):
            frame[f"in_{name}"] = frame["gene"].isin(sets[name])
        frame["protocol"] = PROTOCOL_LABEL[protocol]
        scored.per_gene_frames.append(frame)
        scored.per_sample[sid] = {**res, "missing_genes": missing, **extra}
        xy = coords[rows] if coords is not None else None
        scored.plot_inputs[sid] = (xy, barcodes, predicted, true, present, frame)
    return scored


def _overall(
    per_sample: dict[str, dict[str, Any]], test_samples: list[str], set_names: list[str]
) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1) over test samples of every per-sample value."""
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
    return overall


def _gene_set_records(
    selection: dict[str, Any] | None,
    scored: _Scored,
    genes: list[str],
    marker_genes: list[str],
    markers_not_predicted: list[str],
    *,
    n_top: int,
    given_markers: list[str] | None,
) -> dict[str, Any]:
    """metrics.json "gene_sets": each set's rule, where it was chosen and its genes (per sample)."""
    heg_name, hvg_name = f"heg{n_top}", f"hvg{n_top}"
    samples = list(scored.sets_per_sample)
    if selection is not None:
        rule_heg = f"top {n_top} by mean log1p expression over the pooled spots of the training samples"
        rule_hvg = (
            f"top {n_top} by Seurat-v1 normalised dispersion over the pooled spots of the training samples"
        )
        selected_on: Any = selection["samples"]
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
            "genes": selection["heg"] if selection is not None else None,
            "genes_per_sample": {s: scored.sets_per_sample[s][heg_name] for s in samples},
        },
        hvg_name: {
            "rule": rule_hvg,
            "hvg_n_bins": HVG_N_BINS,
            "selected_on": selected_on,
            "genes": selection["hvg"] if selection is not None else None,
            "genes_per_sample": {s: scored.sets_per_sample[s][hvg_name] for s in samples},
        },
        "markers": {
            "rule": "given marker list" if given_markers is not None else "default marker list",
            "selected_on": "none (fixed in advance)",
            "genes": marker_genes,
            "not_predicted": markers_not_predicted,
        },
        "all": {"rule": "every predicted gene", "selected_on": "none", "genes": genes},
    }
    if selection is not None and selection["missing"]:
        gene_sets[heg_name]["not_in_training_samples"] = selection["missing"]
        gene_sets[hvg_name]["not_in_training_samples"] = selection["missing"]
    return gene_sets


def _metrics_record(
    pred: ad.AnnData,
    pred_path: Path | None,
    info: dict[str, Any],
    dataset: PreparedDataset,
    test_samples: list[str],
    *,
    protocol: str,
    leakage: dict[str, Any],
    gene_sets: dict[str, Any],
    per_sample: dict[str, dict[str, Any]],
    overall: dict[str, Any],
) -> dict[str, Any]:
    """The metrics dict written to metrics.json (before NaN is made null)."""
    synthetic = bool(info.get("synthetic", False))
    provenance_keys = (
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
    return {
        "protocol": PROTOCOL_LABEL[protocol],
        "protocol_id": protocol,
        "protocol_note": PROTOCOL_NOTE[protocol],
        "pcc_pooling": PCC_POOLING,
        "constant_gene_rule": CONSTANT_RULE,
        "normalisation": f"library size scaled to target_sum={info['target_sum']:g}, then log1p",
        "synthetic": synthetic,
        "synthetic_note": SYNTHETIC_NOTE if synthetic else None,
        "prediction": {
            "path": None if pred_path is None else str(pred_path.resolve()),
            **{k: info.get(k) for k in provenance_keys},
            "n_spots": int(pred.n_obs),
            "n_genes": int(pred.n_vars),
        },
        "data_dir": str(dataset.root.resolve()),
        "test_samples": test_samples,
        "leakage": leakage,
        "gene_sets": gene_sets,
        "per_sample": per_sample,
        "overall": overall,
        "cmrcnet_version": __version__,
    }


def _write_outputs(
    out_dir: Path,
    dataset: PreparedDataset,
    metrics: dict[str, Any],
    scored: _Scored,
    set_names: list[str],
    *,
    plots: bool,
) -> None:
    """genes.csv, summary.md, the plots, report.html and metrics.json (last) in `out_dir`."""
    label, synthetic = metrics["protocol"], bool(metrics["synthetic"])
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ["metrics.json", "genes.csv", "summary.md"]
    genes_df = pd.concat(scored.per_gene_frames, ignore_index=True)
    if plots:
        plot_inputs = {
            sid: (
                xy if xy is not None else np.asarray(dataset.read_counts(sid)[barcodes].obsm[SPATIAL_KEY]),
                predicted,
                true,
                present,
                frame,
            )
            for sid, (xy, barcodes, predicted, true, present, frame) in scored.plot_inputs.items()
        }
        files += write_plots(out_dir, dataset, plot_inputs, metrics, set_names, label, synthetic)
    with atomic_path(out_dir / "genes.csv") as tmp:
        genes_df.to_csv(tmp, index=False)
    write_text(out_dir / "summary.md", summary_markdown(metrics, set_names))
    metrics["files"] = [*files, REPORT_FILE]
    evaluation_report(out_dir, metrics, set_names, files)
    write_json(out_dir / "metrics.json", metrics)
    logger.info("evaluation (%s) written to %s", label, out_dir)


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
