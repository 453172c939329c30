"""Print the README's accuracy tables from benchmarks/results/her2st_accuracy.json (so both hold the same numbers).

    python -m accuracy.readme_table [RESULT.json]      (from benchmarks/)
"""

from __future__ import annotations

import sys
from pathlib import Path

from .report import _cell, _ci, peer
from .results import read_record

ROWS = ("cmrcnet-ssl+hc", "cmrcnet-rand+hc", "cmrcnet-cpu30", "cmrcnet-ssl+hc+bank", "cmrcnet-rand+hc+bank",
        "cmrcnet-cpu30+bank", "cmrcnet-paper60", "cmrcnet-paper60+bank", "cmrcnet-paper60-cpu", "cmrcnet-paper60-cpu+bank",
        "bleep-ssl+hc", "bleep-rand+hc", "bleep-ssl+hc+bank", "bleep-rand+hc+bank", "bleep-paper60", "bleep-paper60+bank",
        "regression-ssl+hc", "regression-rand+hc", "ridge-ssl+hc", "ridge-rand+hc", "knn-ssl+hc", "knn-rand+hc",
        "knn-handcrafted", "mean")
VS = ("knn-handcrafted", "knn", "ridge", "bleep")


def table(summary: dict, rows: tuple[str, ...] = ROWS, *, paired: bool = True) -> str:
    head = ["method", "sections x seeds", "HEG-50 PCC", "HVG-50 PCC", "markers PCC", "spot-wise PCC"]
    if paired:
        head += [f"HEG-50 vs {v}" for v in VS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in [r for r in rows if r in summary] + sorted(
            m for m in summary if m not in rows and "+smooth" in m and m.startswith("cmrcnet")):
        e = summary[m]
        seeds = sorted({len(v) for v in e["seeds_per_section"].values()})
        cells = [m, f"{len(e['tests'])} x {'/'.join(map(str, seeds))}"]
        cells += [_cell(e[k]) for k in ("pcc_heg50", "pcc_hvg50", "pcc_markers", "spotwise_pcc")]
        if paired:
            for kind in VS:
                b = peer(m, kind, summary)
                cells.append(_ci(e["vs"][b]) if b and b in e["vs"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


MARKER_ROWS = ("cmrcnet-ssl+hc", "cmrcnet-rand+hc", "cmrcnet-cpu30", "cmrcnet-ssl+hc+bank", "cmrcnet-ssl+hc+smooth",
               "cmrcnet-ssl+hc+bank+smooth", "cmrcnet-ssl+hc+bank-ens+smooth", "bleep-ssl+hc", "regression-ssl+hc",
               "knn-ssl+hc", "knn-handcrafted")


def markers_table(summary: dict, rows: tuple[str, ...] = MARKER_ROWS) -> str:
    """Marker PCC with the per-section paired differences (bootstrap over sections only)."""
    head = ["method", "sections x seeds", "markers PCC"] + [f"markers vs {v}" for v in VS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in [r for r in rows if r in summary]:
        e = summary[m]
        seeds = sorted({len(v) for v in e["seeds_per_section"].values()})
        cells = [m, f"{len(e['tests'])} x {'/'.join(map(str, seeds))}", _cell(e["pcc_markers"])]
        for kind in VS:
            b = peer(m, kind, summary)
            cells.append(_ci(e["vs"][b], "markers") if b and b in e["vs"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
