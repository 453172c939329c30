"""Self-contained HTML reports (`report.html`) people open in a browser: images embedded, tables, provenance.

Rendered with Jinja2 templates (`reports/templates/`, autoescaped). Images are embedded as base64 data URIs so a
report can be mailed or moved on its own; the batch index links the slides' own reports by relative path.
`evaluate`, `predict-slide` and `predict-slides` write them.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cmrcnet import __version__
from cmrcnet.atomic import write_text

REPORT_FILE = "report.html"
INDEX_FILE = "index.html"


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cmrcnet.reports", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["plain"] = _plain
    return env


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}" if value == value else "n/a"


def _plain(value: Any) -> str:
    """A provenance value as short text (lists and dicts as compact JSON)."""
    if isinstance(value, Mapping | list | tuple):
        text = json.dumps(value, default=str)
        return text if len(text) <= 300 else text[:297] + "..."
    return str(value)


def embed_png(path: str | Path) -> str | None:
    """A PNG file as a data URI (None when the file is absent)."""
    path = Path(path)
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figures(folder: Path, names: Sequence[str], captions: Mapping[str, str] | None = None) -> list[dict]:
    """[{"src": data URI, "caption": ...}] for the PNGs of `names` found in `folder`."""
    out = []
    for name in names:
        src = embed_png(folder / name)
        if src:
            out.append({"src": src, "caption": (captions or {}).get(name, name)})
    return out


def render(template: str, out_path: str | Path, **context: Any) -> Path:
    """Render `template` with `context` (plus version and time) into `out_path`, atomically."""
    context.setdefault("generated", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    context.setdefault("version", __version__)
    html = _environment().get_template(template).render(**context)
    write_text(out_path, html)
    return Path(out_path)


def evaluation_report(out_dir: Path, metrics: dict, set_names: Sequence[str], files: Sequence[str]) -> Path:
    """report.html of `evaluate`: overall and per-sample tables, gene-set notes, maps, provenance."""
    rows = []
    for sid, m in metrics["per_sample"].items():
        sets = m.get("gene_sets", {})
        rows.append({"sample": sid, **{s: sets.get(s, {}).get("mean_pcc") for s in set_names},
                     "mse": m.get("mse"), "spotwise": m.get("spotwise_pcc")})  # fmt: skip
    overall = metrics["overall"]
    maps = [f for f in files if f.endswith(".png")]
    return render(
        "evaluation.html.j2",
        out_dir / REPORT_FILE,
        title=f"cmrcnet evaluation ({metrics['protocol']})",
        metrics=metrics,
        set_names=list(set_names),
        overall={s: overall.get(f"pcc_{s}", {}).get("mean") for s in set_names},
        rows=rows,
        figures=figures(out_dir, maps),
        provenance=metrics.get("prediction", {}),
    )


def slide_report(out_dir: Path, summary: dict, provenance: Mapping[str, Any], files: Sequence[str]) -> Path:
    """report.html of `predict-slide`: warnings, the maps side by side with the slide, tile counts, timing,
    retrieval confidence, provenance."""
    order = ["thumbnail.png", "tissue_mask.png", "tumour_score.png", "tumour_mask.png", "confidence.png"]
    maps = [f for f in order if f in files] + sorted(f for f in files if f.startswith("heatmap_"))
    keep = ("kind", "method", "run_dir", "checkpoint", "train_samples", "bank_samples", "k", "precision",
            "precision_reason", "pixel_size_um", "pixel_size_source", "fov_um", "step_um", "level",
            "tumour_markers", "confidence", "synthetic", "transductive", "cmrcnet_version")  # fmt: skip
    return render(
        "slide.html.j2",
        out_dir / REPORT_FILE,
        title=f"cmrcnet slide prediction: {summary['sample_id']}",
        summary=summary,
        warnings=list(summary.get("warnings", [])),
        confidence=summary.get("confidence") or {},
        figures=figures(out_dir, maps),
        provenance={k: provenance[k] for k in keep if k in provenance},
    )


def batch_index(out_dir: Path, table: Sequence[Mapping[str, Any]], counts: Mapping[str, int]) -> Path:
    """index.html of `predict-slides`: every slide with its status, linked to its own report."""
    rows = []
    for r in table:
        link = f"{r['sample_id']}/{REPORT_FILE}"
        rows.append({**r, "link": link if (out_dir / link).is_file() else None})
    return render(
        "index.html.j2", out_dir / INDEX_FILE, title="cmrcnet predict-slides", rows=rows, counts=counts
    )
