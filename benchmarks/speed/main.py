"""Command line: run the sections asked for, merge the results, write JSON and Markdown."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    FULL,
    QUICK,
    QUICK_RESULTS,
    RESULT_MARK,
    RESULTS,
    SECTIONS,
    WAIT,
    command_line,
    loadavg,
    section,
)
from .inference import measure_embed, sec_inference
from .peak import sec_peak
from .report import write_markdown
from .retrieval import sec_retrieval
from .slide import sec_slide
from .targets import findings, targets
from .train import measure_train, sec_train
from _machine import git_commit

DOC = sys.modules[__package__].__doc__ or ""  # the package docstring: what each section measures


# ---------------------------------------------------------------------------------------------- main
def worker(spec: dict) -> None:
    """A torch.compile measurement in its own process (see run_worker): compiled vs eager, interleaved."""
    kind = spec.pop("kind")
    if kind == "train":
        configs = {"baseline": {}, "torch.compile": {"compile": True}}
        res = measure_train(spec.pop("preset"), spec.pop("precision"), configs=configs, **spec)
    elif kind == "embed":
        configs = {
            "baseline bf16": {"precision": "bf16"},
            "torch.compile": {"precision": "bf16", "compile": True, "ref": "baseline bf16"},
        }
        res = measure_embed(spec.pop("preset"), configs=configs, **spec)
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    print(RESULT_MARK + json.dumps(res), flush=True)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=DOC.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="toy sizes, about a minute; writes results/speed_quick.json"
    )
    ap.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    ap.add_argument("--out", type=Path, help="results JSON (the .md is written next to it)")
    ap.add_argument("--workdir", type=Path, help="where the slide section writes its files (default: temp)")
    ap.add_argument(
        "--max-wait",
        type=float,
        default=0.0,
        help="before each measurement wait up to this many seconds for other processes to use < 0.3 cores",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    WAIT["max_s"] = args.max_wait
    if args.worker:
        worker(json.loads(args.worker))
        return
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    p = QUICK if args.quick else FULL
    out_path = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    report: dict[str, Any] = {"sections": {}}
    if out_path.is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            report = json.loads(out_path.read_text(encoding="utf-8"))
    report.update({
        "benchmark": "speed",
        "description": DOC.strip().splitlines()[0],
        "command": command_line(),
        "git_commit": git_commit(),
        "quick": bool(args.quick),
        "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
    })  # fmt: skip
    sections = report.setdefault("sections", {})
    t_start = time.perf_counter()
    load_start = loadavg()

    def save() -> None:
        report["targets"] = targets(sections, bool(args.quick))
        report["notes"] = findings(sections)
        write_json(out_path, report)
        write_markdown(out_path.with_suffix(".md"), report)

    peak = None
    needs_peak = any(s in wanted for s in ("peak", "train", "inference"))
    order = [s for s in SECTIONS if s in wanted or (s == "peak" and needs_peak)]
    for name in order:
        with section(name, sections) as out:
            try:
                if name == "peak":
                    peak = sec_peak(p, out)
                elif name == "train":
                    sec_train(p, peak, out)
                elif name == "inference":
                    sec_inference(p, peak, out)
                elif name == "retrieval":
                    sec_retrieval(p, out)
                elif name == "slide":
                    sec_slide(p, out, args.workdir)
            except Exception as exc:  # record and go on with the other sections
                import traceback

                traceback.print_exc()
                out["error"] = f"{type(exc).__name__}: {exc}"
        save()
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    report["load_average_start_end"] = [load_start, loadavg()]
    save()
    print(f"wrote {out_path} and {out_path.with_suffix('.md')} in {report['wall_seconds']} s")
