"""Does the retrieval k need choosing again when other patients' expression-only sections join the bank?

    python benchmarks/bank_k.py [--work /tmp/acc] [--fold patient-test-B] [--variant cmrcnet-cpu60] [--seeds 0,1,2]

Reads the models the accuracy benchmark trained under WORK (`benchmarks/her2st_accuracy.py --work WORK`; nothing is
trained here) and predicts the fold's held-out sections as `predict` does by default (stain-normalised onto the
run's stain_reference.json, smoothed) four ways: the training bank or the training bank plus the fold's
expression-only sections of other patients (`cmrcnet bank add`), each with the former fixed k = 50 and with the k
`cmrcnet.inference.kchoice.choose_run_k` chooses for that bank (what `train` and `bank add` now do). Writes
benchmarks/results/bank_k.json (command, commit, machine, per-seed rows, means) and prints the means. Skips with a
message when the runs are absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cmrcnet.atomic import write_json
from cmrcnet.constants import DEFAULT_SMOOTH
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.inference.bank import build_bank, load_bank, merge_banks
from cmrcnet.inference.kchoice import choose_run_k
from cmrcnet.inference.predict import predict_spots, run_stain_target
from cmrcnet.run.load import load_trained_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info, provenance
from accuracy import plan, runner

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "bank_k.json"
FIXED_K = 50  # retrieval.k before "auto"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/cmrcnet_her2st_accuracy"))
    ap.add_argument("--fold", default="patient-test-B")
    ap.add_argument("--variant", default="cmrcnet-cpu60")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true", help="the accuracy benchmark's --quick runs (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    work = args.work / ("quick" if args.quick else "full")
    ds = work / "ds"
    fold = next(f for f in plan.folds(["patient"], quick=args.quick) if f["name"] == args.fold)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [work / "runs" / fold["name"] / f"{args.variant}-seed{s}" for s in seeds]
    if runner.runs_absent(runs, ds, args.work):
        return 0
    machine = machine_info()
    t0 = time.perf_counter()
    dataset = PreparedDataset(ds)
    rows = []
    for seed, rdir in zip(seeds, runs, strict=True):
        trained = load_trained_model(rdir)
        own = load_bank(rdir, trained)
        extra = build_bank(trained, dataset, fold["extra_bank"], allow_missing_genes=True, progress=False)
        banks = {"training bank": own, "+ expression-only bank": merge_banks(own, extra)}
        target = run_stain_target(trained)
        for bank_name, bank in banks.items():
            choice = choose_run_k(trained, bank, dataset)
            for k_name, k in ((f"k = {FIXED_K}", FIXED_K), ("chosen k", choice.k)):
                for test in fold["tests"]:
                    pred = predict_spots(trained, bank, ds, [test], None, k=k, progress=False, stain_target=target,
                                         smooth=DEFAULT_SMOOTH)
                    with tempfile.TemporaryDirectory() as tmp:
                        m = runner.evaluate_row(pred, ds, Path(tmp))
                    row = {"seed": seed, "test": test, "bank": bank_name, "k_rule": k_name, "k": int(k),
                           "bank_spots": len(bank), "pcc_heg50": m["pcc_heg50"], "pcc_markers": m["pcc_markers"],
                           "k_scores": {str(a): b for a, b in choice.scores.items()} if k_name == "chosen k" else {}}
                    rows.append(row)
                    print(f"seed {seed} {test:6s} {bank_name:24s} {k_name:9s} (k={k:4d}): HEG-50 "
                          f"{row['pcc_heg50']:.3f}  markers {row['pcc_markers']:.3f}", flush=True)
    means = []
    for test in fold["tests"]:
        for bank_name in ("training bank", "+ expression-only bank"):
            for k_name in (f"k = {FIXED_K}", "chosen k"):
                sel = [r for r in rows if (r["test"], r["bank"], r["k_rule"]) == (test, bank_name, k_name)]
                means.append({"test": test, "bank": bank_name, "k_rule": k_name, "k": [r["k"] for r in sel],
                              "pcc_heg50": float(np.mean([r["pcc_heg50"] for r in sel])),
                              "pcc_heg50_per_seed": [round(r["pcc_heg50"], 4) for r in sel],
                              "pcc_markers": float(np.mean([r["pcc_markers"] for r in sel]))})
    result = {
        "benchmark": "retrieval k with and without other patients' expression-only sections in the bank",
        **provenance("bank_k.py", argv, machine),
        "fold": fold["name"], "train": fold["train"], "tests": fold["tests"], "extra_bank": fold["extra_bank"],
        "variant": args.variant, "seeds": seeds, "quick": args.quick,
        "prediction": f"as `predict` by default: stain-normalised onto the run's stain reference, smooth "
                      f"{DEFAULT_SMOOTH}",
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "means": means,
        "rows": rows,
    }
    write_json(args.out, result)
    print("\nmean over seeds (HEG-50 / markers PCC):")
    for m in means:
        print(f"  {m['test']:6s} {m['bank']:24s} {m['k_rule']:9s} k={m['k']}: {m['pcc_heg50']:.3f} / "
              f"{m['pcc_markers']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
