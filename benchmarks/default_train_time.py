"""Wall time of the default `cmrcnet train` (no recipe flags) on every imaged her2st section: C2-C6 and B4,
about 1,200 spots, on this machine. The target is a laptop: at most 30 minutes on 2 CPU cores.

    python benchmarks/default_train_time.py [--her2st ../shared/data/her2st] [--work DIR] [--data DS]

Prepares the six sections into WORK/ds at 224 um, `cmrcnet prepare`'s default for legacy ST (or reads an already prepared `--data DS`; never the repository), runs
`cmrcnet train --data DS --train-samples C2,C3,C4,C5,C6,B4 --out WORK/run` as a user would, and writes
benchmarks/results/default_train_time.json with the command, commit, machine, load, the run's preset, epochs,
spots and the wall time (process start to exit, gene selection and the bank included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cmrcnet.atomic import write_json
from cmrcnet.constants import ST_FOV_UM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import git_commit, machine_info
from accuracy.runner import prepare

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "default_train_time.json"
SAMPLES = ("C2", "C3", "C4", "C5", "C6", "B4")
TARGET_S = 30 * 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--her2st", type=Path, default=HERE.parent.parent / "shared" / "data" / "her2st")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--data", type=Path, help="a dataset already holding C2-C6 and B4 (skips prepare)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)

    if args.data is None and not args.her2st.is_dir():
        print(f"her2st data not found at {args.her2st}; nothing measured", file=sys.stderr)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="cmrcnet_default_train_"))
    ds = args.data or work / "ds"
    if args.data is None:
        # the accuracy benchmark's (skips prepared samples), at the field of view `cmrcnet prepare` gives legacy ST
        prepare(args.her2st, ds, list(SAMPLES), work, fov_um=ST_FOV_UM)
    run_dir = work / "run"
    train = [
        "cmrcnet",
        "train",
        "--data",
        str(ds),
        "--train-samples",
        ",".join(SAMPLES),
        "--out",
        str(run_dir),
    ]
    machine = machine_info()
    print("+", " ".join(train), flush=True)
    start = time.perf_counter()
    subprocess.run(train, check=True)
    wall = time.perf_counter() - start

    run = json.loads((run_dir / "run.json").read_text())
    spots = json.loads((run_dir / "spots.json").read_text())
    config = (run_dir / "config.yaml").read_text()
    result = {
        "benchmark": "default cmrcnet train wall time",
        "command": " ".join(
            ["python", "benchmarks/default_train_time.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "train_command": " ".join([*train[:3], "DS", *train[4:6], "--out", "RUN"]),
        "commit": git_commit(),
        "machine": machine,
        "load_average_at_end": list(os.getloadavg()),
        "samples": list(SAMPLES),
        "fov_um": run.get("fov_um"),  # the patches' field of view (prepare's default for legacy ST: 224 um)
        "n_train_spots": sum(len(ids) for ids in spots["train"].values()),
        "n_val_spots": sum(len(ids) for ids in spots["validation"].values()),
        "config_yaml": config,
        "precision": run.get("precision"),
        "wall_seconds": round(wall, 1),
        "target_seconds": TARGET_S,
        "within_target": wall <= TARGET_S,
    }
    write_json(args.out, result)
    print(
        f"default train on {result['n_train_spots']} + {result['n_val_spots']} spots: {wall / 60:.1f} min "
        f"({'within' if result['within_target'] else 'OVER'} the 30 min target); wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
