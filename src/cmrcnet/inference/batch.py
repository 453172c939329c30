"""`cmrcnet predict-slides`: many slides from a manifest, resumable, shardable over job arrays and torchrun.

Manifest: a CSV with a header; `slide` (a path, relative paths from the manifest's folder) is required,
`pixel_size` (um per full-resolution pixel) and `sample_id` (default: the file name) are optional. Each slide's
outputs go into OUT/<sample_id>/ (the files of `predict-slide`), written into a temporary folder and renamed
into place, so a killed run never leaves half a slide. A slide is finished when OUT/<sample_id>/done.json holds
the same fingerprint: the SHA-256 of the slide file's content, the model's weights and bank files, and the
prediction options. A rerun skips finished slides and redoes the rest (a changed slide, model or option counts as
not finished). A slide that fails is recorded (OUT/<sample_id>.failed.json, and in the summary) and the batch
goes on.

Sharding: row i of the manifest belongs to shard i mod N. `shard="K/N"` (``--shard K/N``; K = 0..N-1, e.g.
SLURM's $SLURM_ARRAY_TASK_ID with ``--array=0-(N-1)``) and torchrun (RANK of WORLD_SIZE) combine: the process takes shard
K * WORLD_SIZE + RANK of N * WORLD_SIZE. No process talks to another; every one writes its own rows, and the
summary is rebuilt from the per-slide records (OUT/summary.csv, OUT/summary.json) by each process at its end.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cmrcnet import __version__
from cmrcnet.atomic import atomic_dir, atomic_path, write_json
from cmrcnet.errors import CmrcnetError, ConfigError, InputFileError, require_file
from cmrcnet.models.encoders import file_sha256
from cmrcnet.reports import batch_index
from cmrcnet.run.layout import BANK_FILE, BEST_CKPT, LAST_CKPT

logger = logging.getLogger(__name__)

DONE_FILE = "done.json"
FAILED_SUFFIX = ".failed.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
SUMMARY_COLUMNS = (
    "row",
    "sample_id",
    "slide",
    "status",
    "n_tissue_tiles",
    "tiles_per_second",
    "seconds",
    "error",
    "warnings",
)
FAILURE_EXIT_BASE = 100  # exit code = 100 + number of failed slides (capped at 255), 0 when none failed


@dataclass(frozen=True)
class ManifestRow:
    row: int  # 0-based position in the manifest (decides the shard)
    slide: Path
    sample_id: str
    pixel_size_um: float | None


@dataclass
class BatchResult:
    out_dir: Path
    rows: list[dict] = field(default_factory=list)  # this process's rows: status done / skipped / failed

    @property
    def n_failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.rows)

    @property
    def exit_code(self) -> int:
        return 0 if not self.n_failed else min(FAILURE_EXIT_BASE + self.n_failed, 255)


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """The manifest's rows; errors name the file, the row and the problem."""
    path = require_file(path, "manifest")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(f"cannot read the manifest CSV ({exc})", path=path) from exc
    if "slide" not in header:
        raise InputFileError(
            f"the manifest needs a header with a 'slide' column (optional: pixel_size, sample_id); got {header}",
            path=path,
        )
    from cmrcnet.inference.slide import slide_id

    rows, seen = [], {}
    for i, rec in enumerate(records):
        rec = {(k or "").strip(): (v or "").strip() for k, v in rec.items()}
        if not rec.get("slide"):
            raise InputFileError(f"row {i + 2}: empty 'slide'", path=path)
        slide = Path(rec["slide"])
        slide = slide if slide.is_absolute() else path.parent / slide
        um = None
        if rec.get("pixel_size"):
            try:
                um = float(rec["pixel_size"])
            except ValueError:
                um = math.nan
            if not (um > 0 and math.isfinite(um)):
                raise InputFileError(
                    f"row {i + 2}: pixel_size must be a positive number, got {rec['pixel_size']!r}", path=path
                )
        sid = rec.get("sample_id") or slide_id(slide)
        if not re.fullmatch(r"[A-Za-z0-9._-]+", sid):
            raise InputFileError(
                f"row {i + 2}: sample_id {sid!r} must use only letters, digits, '.', '_', '-'", path=path
            )
        if sid in seen:
            raise InputFileError(
                f"rows {seen[sid] + 2} and {i + 2} have the same sample_id {sid!r}", path=path
            )
        seen[sid] = i
        rows.append(ManifestRow(i, slide, sid, um))
    if not rows:
        raise InputFileError("the manifest lists no slides", path=path)
    return rows


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N; None -> (0, 1)."""
    if text is None:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(f"shard must be K/N with 0 <= K < N (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def process_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """This process's (index, count) of shards: `shard` combined with torchrun's RANK / WORLD_SIZE."""
    k, n = shard
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return k * world + rank, n * world


def model_fingerprint(run_dir: str | Path) -> str:
    """SHA-256 over the run's checkpoint and bank files (whichever exist)."""
    h = hashlib.sha256()
    for name in (BEST_CKPT, LAST_CKPT, BANK_FILE, "config.yaml", "genes.json"):
        p = Path(run_dir) / name
        if p.is_file():
            h.update(name.encode())
            h.update(file_sha256(p).encode())
    return h.hexdigest()


def predict_slides(
    manifest: str | Path,
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    shard: str | tuple[int, int] | None = None,
    progress: bool = True,
    **options: Any,
) -> BatchResult:
    """Predict every slide of this process's shard of `manifest` into `out_dir` (see the module docstring).

    `options` go to `cmrcnet.inference.slide.predict_slide` (step_um, genes, markers, threshold, batch_size,
    precision, device, k, weighting, min_tissue, tissue, reader, plots); a manifest row's pixel_size overrides
    `pixel_size_um`. Returns this process's rows; `BatchResult.exit_code` is 0 or 100 + the failures.
    """
    from cmrcnet.inference.slide import predict_slide

    rows = read_manifest(manifest)
    k, n = process_shard(parse_shard(shard) if not isinstance(shard, tuple) else shard)
    mine = [r for r in rows if r.row % n == k]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_fp = model_fingerprint(run_dir)
    default_um = options.pop("pixel_size_um", None)
    result = BatchResult(out)
    logger.info("predict-slides: shard %d/%d: %d of %d slides -> %s", k, n, len(mine), len(rows), out)
    for r in tqdm(mine, desc="slides", unit="slide", disable=not progress):
        um = r.pixel_size_um if r.pixel_size_um is not None else default_um
        t0 = time.perf_counter()
        record: dict[str, Any] = {"row": r.row, "sample_id": r.sample_id, "slide": str(r.slide)}
        failed = out / f"{r.sample_id}{FAILED_SUFFIX}"
        try:
            fingerprint = _fingerprint(r, model_fp, um, options)
            dest = out / r.sample_id
            done = _read_done(dest)
            if done and done.get("fingerprint") == fingerprint:
                record.update(
                    status="skipped", **{key: done.get(key) for key in ("n_tissue_tiles", "tiles_per_second")}
                )
                result.rows.append(record)
                continue
            with atomic_dir(dest) as tmp:
                pred = predict_slide(
                    run_dir, r.slide, tmp, pixel_size_um=um, sample_id=r.sample_id, progress=progress, **options
                )
                stats = {
                    "n_tissue_tiles": pred.stats["n_tissue_tiles"],
                    "tiles_per_second": pred.stats["tiles_per_second"],
                    "warnings": list(pred.stats.get("warnings", [])),
                }
                write_json(tmp / DONE_FILE, {"fingerprint": fingerprint, "slide": str(r.slide), "model": str(run_dir),
                                             "cmrcnet_version": __version__, **stats})  # fmt: skip
            failed.unlink(missing_ok=True)
            record.update(status="done", seconds=round(time.perf_counter() - t0, 2), **stats)
        except Exception as exc:  # one broken slide never stops the batch
            message = exc.problem if isinstance(exc, CmrcnetError) else f"{type(exc).__name__}: {exc}"
            if isinstance(exc, CmrcnetError) and exc.path is not None:
                message = f"{exc.path}: {message}"
            logger.error("slide %s (%s) failed: %s", r.sample_id, r.slide, message)
            record.update(status="failed", error=message, seconds=round(time.perf_counter() - t0, 2))
            write_json(failed, {**record, "traceback": traceback.format_exc()})
        result.rows.append(record)
    write_summary(rows, out)
    return result


def _fingerprint(r: ManifestRow, model_fp: str, um: float | None, options: dict) -> str:
    slide = require_file(r.slide, "slide")
    described = json.dumps(
        {"slide": file_sha256(slide), "model": model_fp, "pixel_size_um": um, "sample_id": r.sample_id,
         "options": {k: options[k] for k in sorted(options)}},
        sort_keys=True,
        default=str,
    )  # fmt: skip
    return hashlib.sha256(described.encode()).hexdigest()


def _read_done(dest: Path) -> dict | None:
    try:
        return json.loads((dest / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_summary(rows: Sequence[ManifestRow], out: Path) -> list[dict]:
    """OUT/summary.csv and summary.json over the whole manifest, from the per-slide records on disk
    (done, failed or pending: a slide another shard has not finished yet)."""
    table = []
    for r in rows:
        rec: dict[str, Any] = {
            "row": r.row,
            "sample_id": r.sample_id,
            "slide": str(r.slide),
            "status": "pending",
        }
        done = _read_done(out / r.sample_id)
        failed = out / f"{r.sample_id}{FAILED_SUFFIX}"
        if done:
            rec.update(
                status="done",
                n_tissue_tiles=done.get("n_tissue_tiles"),
                tiles_per_second=done.get("tiles_per_second"),
                warnings=list(done.get("warnings", [])),
            )
        elif failed.is_file():
            try:
                info = json.loads(failed.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                info = {}
            rec.update(status="failed", error=info.get("error"), seconds=info.get("seconds"))
        table.append(rec)
    with atomic_path(out / SUMMARY_CSV) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**t, "warnings": " | ".join(t.get("warnings", []))} for t in table)
    counts = {s: sum(t["status"] == s for t in table) for s in ("done", "failed", "pending")}
    write_json(out / SUMMARY_JSON, {"n_slides": len(table), **counts, "slides": table})
    batch_index(out, table, counts)  # index.html, linking every slide's report.html
    return table
