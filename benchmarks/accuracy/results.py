"""The result file pair: STEM.json (the record's description: command, machine, parts, folds, variants) and
STEM_runs.json.xz (the rows, with the per-gene HEG-50 PCC the paired statistics need, the machine and parts they
were measured on, so the sidecar alone says where its numbers come from, and the summary: per-method statistics
and every paired difference). `read_record` puts them back together. Floats are rounded to 4 decimals (far below
the run-to-run spread) and the JSON is compact; the summary, which grows with the square of the methods, lives
in the compressed sidecar, so neither file grows beyond about a megabyte (the repository's limit per file). The
sidecar is xz-compressed: the rows repeat each test section's gene names, which xz's larger window finds and
gzip's 32 KB window does not (about a quarter smaller); sidecars written as .json.gz before are still read."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

from cmrcnet.atomic import atomic_path, write_text

from . import report, stats


def _rounded(obj, digits: int = 4):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def _with_cpu_fields(row: dict, rec: dict) -> dict:
    """`row` with the CPU flags and torch CPU capability it was measured with as fields: read from its own cpu
    line (rows of a merged record), else, in a record of one run, from the record's machine."""
    if "cpu_flags" in row:
        return row
    fields = stats.cpu_record(row.get("cpu"))
    machine = rec.get("machine") or {}
    if not fields and not rec.get("merged_from") and "cpu_flags" in machine:
        fields = {"cpu_flags": machine["cpu_flags"], "torch_cpu_capability": machine.get("torch_cpu_capability")}
    return {**row, **fields}


def runs_path(stem: Path) -> Path:
    return Path(f"{stem}_runs.json.xz")


def _open_sidecar(path: Path, mode: str):
    """A sidecar opened in text mode, xz or (written before) gzip by its name."""
    return gzip.open(path, mode) if str(path).endswith(".gz") else lzma.open(path, mode)


def write_record(stem: Path, rec: dict) -> None:
    """STEM.json, STEM_runs.json.xz and STEM.md, each written atomically."""
    rec = _rounded(rec)
    runs = [_with_cpu_fields(row, rec) for row in rec.get("runs", [])]
    sidecar = {"machine": rec.get("machine"), "parts": rec.get("parts"), "runs": runs, "summary": rec.get("summary")}
    with atomic_path(runs_path(stem)) as tmp, lzma.open(tmp, "wt", preset=9) as f:
        json.dump(sidecar, f, separators=(",", ":"))
    head = {k: v for k, v in rec.items() if k not in ("runs", "summary")} | {"runs_file": runs_path(stem).name,
                                                                           "summary_in": runs_path(stem).name}
    write_text(Path(f"{stem}.json"), json.dumps(head, separators=(",", ":")) + "\n")
    write_text(Path(f"{stem}.md"), report.markdown(rec))


def read_record(path: Path) -> dict:
    """A record written by `write_record` (its rows and summary read back from the sidecar), or an older one."""
    rec = json.loads(Path(path).read_text())
    if "runs" not in rec and rec.get("runs_file"):
        with _open_sidecar(Path(path).parent / rec["runs_file"], "rt") as f:
            sidecar = json.load(f)
        rec["runs"] = sidecar["runs"] if isinstance(sidecar, dict) else sidecar  # older sidecars: the rows alone
        if "summary" not in rec and isinstance(sidecar, dict) and "summary" in sidecar:
            rec["summary"] = sidecar["summary"]  # (records written before kept it in STEM.json)
    return rec
