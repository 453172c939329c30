"""The fold loop of `benchmarks/her2st_accuracy.py` (see its docstring) and the result file."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cmrcnet.data.hdf5 import write_h5ad
from cmrcnet.data.spots import load_spot_table
from cmrcnet.inference.bank import build_bank, load_bank, merge_banks
from cmrcnet.inference.kchoice import K_GRID, choose_run_k
from cmrcnet.inference.predict import predict_spots
from cmrcnet.run.load import load_trained_model

from . import derived, results, runner, stats
from . import methods as M
from . import plan as P
from _machine import git_commit, machine_info

HERE = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--her2st", type=Path, default=HERE.parent.parent / "shared" / "data" / "her2st")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cmrcnet_her2st_accuracy"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--protocols", default="patient,within_patient")
    ap.add_argument("--variants", default=",".join(M.DEFAULT_VARIANTS))
    ap.add_argument("--folds", help="only these folds (comma-separated names, e.g. patient-test-B)")
    ap.add_argument("--merge", nargs="+", type=Path, help="combine result JSON files of earlier runs and exit")
    ap.add_argument("--derive", type=Path, help="add the derived rows (smoothing, seed ensembles) to this result "
                    "JSON from the runs under --work, then exit")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--device", default="cpu", help="training device: cpu, cuda or auto (evaluation stays on the CPU)")
    ap.add_argument("--quick", action="store_true", help="1 fold (train C2, test B4), tiny model, 1 seed, 1 epoch")
    ap.add_argument("--out", type=Path, help="results stem (default benchmarks/results/her2st_accuracy[_quick])")
    return ap.parse_args(argv)


def _parts(rec: dict) -> list[dict]:
    """Where each part of a merged record ran (machine with its CPU flags and torch CPU capability, device,
    commit, wall time, methods). Parts merged before the flags were kept get them from their cpu line."""
    if rec.get("parts"):
        return [{**stats.cpu_record(p.get("cpu")), **p} for p in rec["parts"]]
    variants = sorted(rec.get("variants", {}))
    parts = [_part(rec["command"], rec.get("commit"), rec["machine"], rec.get("device", "cpu"), rec.get("gpu"),
                   rec.get("wall_seconds_sum_of_parts", rec.get("wall_seconds")), variants)]
    if rec.get("derived_by"):  # the derived rows (smoothing, stain, ensembles) were made again by --derive
        d = rec["derived_by"]
        parts.append({**_part(d["command"], d["commit"], d["machine"], "cpu", None, d["wall_seconds"], variants),
                      "derived_rows_only": True})
    return parts


def _part(command: str, commit: str | None, machine: dict, device: str, gpu: str | None, wall_seconds,
          variants: list[str]) -> dict:
    """One entry of a record's `parts`, with the CPU flags measured on `machine` (else read from its cpu line)."""
    measured = {k: machine[k] for k in ("cpu_flags", "torch_cpu_capability") if k in machine}
    return {"command": command, "commit": commit, "cpu": machine.get("cpu_line"),
            **(measured or stats.cpu_record(machine.get("cpu_line"))),
            "device": device, "gpu": gpu, "wall_seconds": wall_seconds, "variants": variants}


def _gpu_name(device: str) -> str | None:
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stem = args.out or HERE / "results" / ("her2st_accuracy_quick" if args.quick else "her2st_accuracy")
    if args.merge:
        records = [results.read_record(p) for p in args.merge]
        for r in records:  # each row keeps the CPU it was measured on: the merged record mixes machines
            parts = _parts(r)
            r["runs"] = [row if "cpu" in row else {**row, "cpu": stats.row_cpu(parts, row["method"])}
                         for row in r["runs"]]
        rec = {**records[-1], "runs": stats.merge_runs(records), "merged_from": [str(p) for p in args.merge],
               "parts": [part for r in records for part in _parts(r)],
               "seeds": sorted({s for r in records for s in r.get("seeds", [])}),
               "command": " && ".join(r["command"] for r in records) + " (merged)",
               "wall_seconds_sum_of_parts": round(sum(r["wall_seconds"] for r in records), 1),
               "encoders": {k: v for r in records for k, v in r["encoders"].items()},
               "variants": {k: v for r in records for k, v in r["variants"].items()}}
        rec["summary"] = stats.summarise(rec["runs"])
        write_results(stem, rec)
        return 0
    if args.derive:
        t_derive = time.time()
        rec = results.read_record(args.derive)
        rows = [r for r in rec["runs"] if not r.get("derived")]
        work = args.work / ("quick" if rec["quick"] else "full")
        folds = {f["name"]: f for f in rec["folds"]}
        rec["runs"] = rows + derived.derived_rows(work, work / "ds", rows, folds, list(rec["variants"]), _row)
        # the derived rows are this command's, not the trained runs' (whose command and commit the record keeps)
        rec["derived_by"] = {"command": " ".join(["python", "benchmarks/her2st_accuracy.py", *map(shlex.quote, sys.argv[1:])]),
                             "commit": git_commit(), "src_uncommitted_changes": runner.git_dirty(),
                             "machine": machine_info(), "wall_seconds": round(time.time() - t_derive, 1)}
        rec["summary"] = stats.summarise(rec["runs"])
        write_results(stem, rec)
        return 0
    if not (args.her2st / "counts").is_dir():
        print(f"her2st data not found at {args.her2st}; nothing to do", file=sys.stderr)
        return 2
    t_start = time.time()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    variants = ["cmrcnet-ssl+hc", "regression-ssl+hc"] if args.quick else args.variants.split(",")
    work = args.work / ("quick" if args.quick else "full")
    ds, cache = work / "ds", work / "feature_cache"
    plan = P.folds(args.protocols.split(","), quick=args.quick)
    if args.folds:
        plan = [f for f in plan if f["name"] in args.folds.split(",")]
    need = sorted({s for f in plan for s in [*f["train"], *f["tests"], *f["pretrain_slides"], *f["extra_bank"]]})
    runner.prepare(args.her2st, ds, need, work)
    for variant in variants:  # variants with their own field of view: the same samples, other patches
        if (vds := runner.variant_ds(ds, variant)) != ds:
            runner.prepare(args.her2st, vds, need, work, M.VARIANTS[variant].fov_um)
    rows: list[dict] = []
    encoders: dict[str, dict] = {}
    rec = {"benchmark": "her2st_accuracy", "quick": args.quick, "complete": False,
           "command": " ".join(["python", "benchmarks/her2st_accuracy.py", *map(shlex.quote, sys.argv[1:])]),
           "commit": git_commit(), "src_uncommitted_changes": runner.git_dirty(), "machine": machine_info(),
           "device": args.device, "gpu": _gpu_name(args.device),
           "seeds": seeds, "markers": M.MARKERS, "k_grid": list(K_GRID), "pretrain_recipe": M.PRETRAIN,
           "variants": {v: {**M.VARIANTS[v].__dict__} for v in variants}, "folds": plan, "encoders": encoders,
           "protocol_titles": P.PROTOCOL_TITLES}
    for seed in seeds:  # seed-major: a run cut short still covers every fold
        for fold in plan:
            rows += run_fold(fold, seed, variants, args, work, ds, cache, encoders,
                             baselines=not any(r["fold"] == fold["name"] and r["seed"] is None for r in rows))
            rec.update(runs=rows, summary=stats.summarise(rows), wall_seconds=round(time.time() - t_start, 1))
            write_results(stem, rec)
    rows += derived.derived_rows(work, ds, rows, {f["name"]: f for f in plan}, variants, _row)
    rec.update(runs=rows, summary=stats.summarise(rows), wall_seconds=round(time.time() - t_start, 1),
               complete=True)
    write_results(stem, rec)
    print(Path(f"{stem}.md").read_text())
    return 0


def write_results(stem: Path, rec: dict) -> None:
    results.write_record(stem, rec)


def _row(fold: dict, test: str, method: str, seed: int | None, metrics: dict, **extra) -> dict:
    row = {"protocol": P.row_protocol(fold, test), "fold": fold["name"], "test": test, "method": method,
           "seed": seed, **extra, **metrics}
    print(json.dumps({k: v for k, v in row.items() if k in ("protocol", "test", "method", "seed", "k",
                                                            "pcc_heg50", "pcc_markers", "spotwise_pcc")}),
          flush=True)
    return row


def run_fold(fold: dict, seed: int, variants: list[str], args, work: Path, ds: Path, cache: Path,
             encoders: dict, *, baselines: bool) -> list[dict]:
    fold_dir = work / "runs" / fold["name"]
    rows: list[dict] = []
    refs: dict = {}  # test section -> a prediction of this fold (obs/var layout for the baselines)
    train = None
    for variant in variants:
        v = M.VARIANTS[variant]
        if (v.only_fold and v.only_fold != fold["name"]) or (v.only_seed is not None and v.only_seed != seed):
            continue
        enc = None
        if v.encoder == "ssl":
            enc = runner.ssl_encoder(work, ds, args.her2st, fold, args.quick)
            encoders[fold["name"]] = json.loads((enc / "encoder.json").read_text())
        elif v.encoder == "random":
            enc = runner.random_encoder(work, "tiny" if args.quick else "cpu")
        rdir = fold_dir / f"{variant}-seed{seed}"
        vds = runner.variant_ds(ds, variant)  # its patches; counts, spots and evaluation as in `ds`
        t_train = runner.trained_run(rdir, variant, seed, fold, vds, enc, args.quick, cache,
                                     device=args.device)
        trained = load_trained_model(rdir)
        if train is None:
            train = load_spot_table(runner.PreparedDataset(ds), fold["train"], list(trained.genes), img_size=224,
                                    target_sum=trained.run_config.genes.target_sum, progress=False)
        banks = {"": None}
        if v.method != "regression":
            bank = load_bank(rdir, trained)
            banks = {"": (bank, None)}
            if fold["extra_bank"]:
                extra = build_bank(trained, runner.PreparedDataset(vds), fold["extra_bank"],
                                   allow_missing_genes=True, progress=False)
                banks["+bank"] = (merge_banks(bank, extra), extra)
        for suffix, pair in banks.items():
            k, scores, how = (None, {}, "")
            if pair is not None:
                choice = choose_run_k(trained, pair[0], runner.PreparedDataset(vds))  # as `cmrcnet train` does
                k, scores, how = choice.k, choice.scores, choice.how
            for test in fold["tests"]:
                pred = predict_spots(trained, None if pair is None else pair[0], vds, [test], None, k=k,
                                     smooth=0.0, progress=False)
                write_h5ad(pred, rdir / f"pred_{test}{suffix}.h5ad")  # for the derived rows (smoothing, ensembles)
                refs.setdefault(test, pred)
                out = rdir / f"eval_{test}{suffix}"
                rows.append(_row(fold, test, variant + suffix, seed, runner.evaluate_row(pred, ds, out), k=k,
                                 k_scores=scores, k_choice=how, k_at_grid_top=k is not None and k >= max(scores),
                                 train_seconds=round(t_train, 1), train_device=args.device,
                                 bank_spots=None if pair is None else len(pair[0]),
                                 bank_samples=None if pair is None else pair[0].samples))
    if baselines and refs:
        rows += baseline_rows(fold, train, refs, variants, seed, fold_dir, ds)
    return rows


def baseline_encoders(train, variants: list[str], seed: int, fold_dir: Path) -> dict[str, tuple]:
    """{feature set: (its frozen encoder, or None for the handcrafted features; the training spots' features)}:
    what the baselines read on the training side, the same whatever is done to the test patches."""
    encoders = {"handcrafted": (None, M.handcrafted(train))}
    for name, source in M.FEATURE_SETS.items():
        rdir = fold_dir / f"{source}-seed{seed}"
        if source in variants and (rdir / "run.json").exists():
            model = load_trained_model(rdir).model
            encoders[name] = (model, M.frozen_features(model, train.images))
    return encoders


def baseline_predictions(fold: dict, train, refs: dict, variants: list[str], seed: int, fold_dir: Path,
                         ds: Path, stain_target=None, stain_rule: str = "reinhard",
                         encoders: dict[str, tuple] | None = None) -> dict[tuple[str, str], tuple]:
    """{(test, method): (prediction AnnData, info)} of mean, kNN on handcrafted features, and kNN + ridge on each
    frozen variant's features (training spots only; deterministic given the frozen encoder). `stain_target`:
    test patches colour-normalised to it first, by `stain_rule` (cmrcnet.data.stain). `encoders`: those of
    `baseline_encoders` when the caller already has them (several stain rules on one fold)."""
    from cmrcnet.data.stain import normalise_to

    data = runner.PreparedDataset(ds)
    tests = {t: load_spot_table(data, [t], None, img_size=224, target_sum=1e4, progress=False)
             for t in refs}
    if stain_target is not None:
        for table in tests.values():
            table.images[:] = torch.from_numpy(normalise_to(table.images.numpy(), stain_target, rule=stain_rule))
    for t, table in tests.items():
        assert table.keys() == list(refs[t].obs_names), "spot order differs from the reference prediction"
    if encoders is None:
        encoders = baseline_encoders(train, variants, seed, fold_dir)
    feats = {name: (f_train, {t: M.handcrafted(x) if model is None else M.frozen_features(model, x.images)
                              for t, x in tests.items()})
             for name, (model, f_train) in encoders.items()}
    out = {}
    for test, ref in refs.items():
        preds = {"mean": (M.mean_prediction(train, ref.n_obs), {})}
        for name, (f_train, f_test) in feats.items():
            preds[f"knn-{name}"] = M.knn_prediction(f_train, f_test[test], train)
            if name != "handcrafted":
                preds[f"ridge-{name}"] = M.ridge_prediction(f_train, f_test[test], train)
        for method, (x, info) in preds.items():
            out[test, method] = (runner.prediction_like(ref, np.asarray(x), method, info), info)
    return out


def baseline_rows(fold: dict, train, refs: dict, variants: list[str], seed: int, fold_dir: Path,
                  ds: Path) -> list[dict]:
    """The baselines' rows (one per section and method, seed None); predictions saved for the derived rows."""
    rows = []
    for (test, method), (pred, info) in baseline_predictions(fold, train, refs, variants, seed, fold_dir,
                                                             ds).items():
        write_h5ad(pred, fold_dir / f"pred_{method}_{test}.h5ad")
        metrics = runner.evaluate_row(pred, ds, fold_dir / f"eval_{method}_{test}")
        rows.append(_row(fold, test, method, None, metrics, k=info.get("k"), k_scores=info.get("k_scores", {}),
                         k_choice=info.get("k_choice", ""),
                         k_at_grid_top="k" in info and info["k"] >= max(info["k_scores"]),
                         probe={k: v for k, v in info.items() if k not in ("k", "k_scores", "k_choice")},
                         train_seconds=0.0))
    return rows
