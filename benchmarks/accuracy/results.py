"""The result file pair: STEM.json (everything but the rows: what tooling and the README read) and
STEM_runs.json.gz (the rows, with the per-gene HEG-50 PCC the paired statistics need, and the machine and parts
they were measured on, so the sidecar alone says where its numbers come from). Floats are rounded to 4
decimals (far below the run-to-run spread) and the JSON is compact, so neither file grows beyond a few hundred KB."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from cmrcnet.atomic import atomic_path, write_text

from . import report


def _rounded(obj, digits: int = 4):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def runs_path(stem: Path) -> Path:
    return Path(f"{stem}_runs.json.gz")


def write_record(stem: Path, rec: dict) -> None:
    """STEM.json, STEM_runs.json.gz and STEM.md, each written atomically."""
    rec = _rounded(rec)
    runs = rec.get("runs", [])
    sidecar = {"machine": rec.get("machine"), "parts": rec.get("parts"), "runs": runs}
    with atomic_path(runs_path(stem)) as tmp, gzip.open(tmp, "wt") as f:
        json.dump(sidecar, f, separators=(",", ":"))
    head = {k: v for k, v in rec.items() if k != "runs"} | {"runs_file": runs_path(stem).name}
    write_text(Path(f"{stem}.json"), json.dumps(head, separators=(",", ":")) + "\n")
    write_text(Path(f"{stem}.md"), report.markdown(rec))


def read_record(path: Path) -> dict:
    """A record written by `write_record` (its rows read back from the sidecar), or an older one-file record."""
    rec = json.loads(Path(path).read_text())
    if "runs" not in rec and rec.get("runs_file"):
        with gzip.open(Path(path).parent / rec["runs_file"], "rt") as f:
            sidecar = json.load(f)
        rec["runs"] = sidecar["runs"] if isinstance(sidecar, dict) else sidecar  # older sidecars: the rows alone
    return rec
