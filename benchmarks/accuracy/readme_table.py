"""Print the README's accuracy tables from benchmarks/results/her2st_accuracy.json (so both hold the same numbers).

    python -m accuracy.readme_table [RESULT.json]      (from benchmarks/)
"""

from __future__ import annotations

import sys
from pathlib import Path

from .report import _cell, _ci, peer
from .results import read_record

ROWS = ("cmrcnet-ssl+hc", "cmrcnet-rand+hc", "cmrcnet-cpu60", "cmrcnet-cpu30", "cmrcnet-cpu30+stain", "cmrcnet-cpu30+stain+smooth",
        "cmrcnet-mid30+stain+smooth", "cmrcnet-cpu60+stain+smooth", "bleep-cpu60+stain+smooth",
        "cmrcnet-cpu60+cstain+smooth", "bleep-cpu60+cstain+smooth", "cmrcnet-cpu60+bank+cstain+smooth",
        "cmrcnet-cpu60-ctx224-rw3+cstain+smooth", "cmrcnet-cpu60-ctx224-rw10+cstain+smooth",
        "cmrcnet-cpu60-ctx224-rw3+bank+cstain+smooth", "cmrcnet-cpu60-ctx224-rw3-last+cstain+smooth",
        "bleep-cpu60-ctx224-last+cstain+smooth",
        "cmrcnet-cpu60-ctx224+cstain+smooth", "bleep-cpu60-ctx224+cstain+smooth", "cmrcnet-cpu60-ctx224+bank+cstain+smooth",
        "cmrcnet-cpu30-trainstain+stain+smooth", "cmrcnet-cpu30-aug",
        "cmrcnet-cpu30-stainaug", "cmrcnet-cpu30-scaleaug", "cmrcnet-ssl+hc+bank", "cmrcnet-rand+hc+bank",
        "cmrcnet-cpu30+bank", "cmrcnet-paper60", "cmrcnet-paper60+bank", "cmrcnet-paper60-cpu", "cmrcnet-paper60-cpu+bank",
        "bleep-ssl+hc", "bleep-rand+hc", "bleep-ssl+hc+bank", "bleep-rand+hc+bank", "bleep-paper60", "bleep-paper60+bank",
        "bleep-cpu60", "ridge-cpu60", "knn-cpu60",
        "regression-ssl+hc", "regression-rand+hc", "ridge-ssl+hc", "ridge-rand+hc", "knn-ssl+hc", "knn-rand+hc",
        "knn-handcrafted", "mean")
VS = ("knn-handcrafted", "knn", "ridge", "bleep")


TITLES = {"pcc_heg50": "HEG-50 PCC", "pcc_hvg50": "HVG-50 PCC", "pcc_markers": "markers PCC",
          "spotwise_pcc": "spot-wise PCC"}
MARKER_ROWS = ("cmrcnet-ssl+hc", "cmrcnet-rand+hc", "cmrcnet-cpu60", "cmrcnet-cpu60+smooth", "cmrcnet-cpu60+stain+smooth",
               "bleep-cpu60+stain+smooth", "cmrcnet-cpu60+cstain+smooth", "bleep-cpu60+cstain+smooth",
               "cmrcnet-cpu60+bank+cstain+smooth", "cmrcnet-cpu60-ctx224-rw3+cstain+smooth",
               "cmrcnet-cpu60-ctx224-rw10+cstain+smooth", "cmrcnet-cpu60-ctx224-rw3-last+cstain+smooth",
               "bleep-cpu60-ctx224-last+cstain+smooth", "cmrcnet-cpu60-ctx224+cstain+smooth", "bleep-cpu60-ctx224+cstain+smooth",
               "cmrcnet-cpu60-ctx224+bank+cstain+smooth", "knn-handcrafted+cstain+smooth",
               "cmrcnet-cpu30", "cmrcnet-cpu30+smooth", "cmrcnet-cpu30+stain+smooth", "cmrcnet-cpu30-aug+smooth", "cmrcnet-ssl+hc+bank", "cmrcnet-ssl+hc+smooth",
               "cmrcnet-ssl+hc+bank+smooth", "cmrcnet-ssl+hc+bank-ens+smooth", "bleep-ssl+hc", "regression-ssl+hc",
               "knn-ssl+hc", "knn-handcrafted")


def _markdown(summary: dict, methods: list[str], metrics: tuple[str, ...], compare: str | None) -> str:
    """One row per method: sections x seeds, `metrics` (mean ± sd over sections) and, with `compare` ("heg50"
    or "markers"), the paired difference against each kind of baseline in `VS`."""
    head = ["method", "sections x seeds", *(TITLES[k] for k in metrics)]
    if compare:
        head += [f"{'HEG-50' if compare == 'heg50' else 'markers'} vs {v}" for v in VS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        e = summary[m]
        seeds = sorted({len(v) for v in e["seeds_per_section"].values()})
        cells = [m, f"{len(e['tests'])} x {'/'.join(map(str, seeds))}", *(_cell(e[k]) for k in metrics)]
        if compare:
            for kind in VS:
                b = peer(m, kind, summary)
                cells.append(_ci(e["vs"][b], compare) if b and b in e["vs"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(summary: dict, rows: tuple[str, ...] = ROWS, *, paired: bool = True) -> str:
    """The main table: `rows` present, then the smoothed CMRCNet rows; HEG-50 paired differences."""
    methods = [r for r in rows if r in summary] + sorted(
        m for m in summary if m not in rows and "+smooth" in m and m.startswith("cmrcnet"))
    return _markdown(summary, methods, ("pcc_heg50", "pcc_hvg50", "pcc_markers", "spotwise_pcc"),
                     "heg50" if paired else None)


def markers_table(summary: dict, rows: tuple[str, ...] = MARKER_ROWS) -> str:
    """Marker PCC with the per-section paired differences (bootstrap over sections only)."""
    return _markdown(summary, [r for r in rows if r in summary], ("pcc_markers",), "markers")


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "results" / "her2st_accuracy.json"
    rec = read_record(path)
    for protocol in ("patient", "patient-degraded", "within_patient"):
        if protocol in rec["summary"]:
            print(f"### {rec.get('protocol_titles', {}).get(protocol, protocol)}\n")
            print(table(rec["summary"][protocol], paired=protocol != "within_patient"))
            print()
            if protocol == "patient":
                print(markers_table(rec["summary"][protocol]))
                print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
