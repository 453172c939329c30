"""The files of an evaluation besides metrics.json: genes.csv, summary.md, expression maps, the PCC histogram."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cmrcnet.data.dataset import PreparedDataset

N_MAP_GENES = 3  # genes per best/median/worst map
MAX_MARKER_MAPS = 12  # marker genes drawn at most
TRANSDUCTIVE_NOTE = (
    "TRANSDUCTIVE: the model's image encoder was pretrained with test slides included (include_test_slides=True, "
    "`cmrcnet pretrain --include-test-slides`)"
)


def _safe_name(sid: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sid) or "sample"


def _title(text: str, label: str, synthetic: bool) -> str:
    return f"{text} [{label}]" + (" - SYNTHETIC data" if synthetic else "")


def write_plots(
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


def summary_markdown(m: dict[str, Any], set_names: list[str]) -> str:
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
