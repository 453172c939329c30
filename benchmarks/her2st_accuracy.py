"""Accuracy on real her2st sections: CMRCNet variants against baselines, several seeds, honest protocols.

    python benchmarks/her2st_accuracy.py [--her2st ../shared/data/her2st] [--work DIR] [--seeds 0,1,2]
        [--protocols loso,cross] [--quick]

Protocols (all from ../shared/data/her2st, prepared by this script into WORK/ds):
  loso   leave-one-section-out within patient C (C2-C6; C1 has no image): train on 4 sections, test the 5th.
         Strict genes: top 250 HVG of the training sections + the breast marker panel.
  cross  cross-patient: train on C2-C6, test on B4 (patient B).
  paper  the loso predictions scored with the paper's protocol (HEG/HVG chosen on each test section's own
         measurements; optimistic, labelled).

Methods (every deep variant uses the "cpu" ViT and the same data; seeds vary initialisation, dropout, order):
  mean            each gene's mean over the training spots (PCC is undefined: constant prediction; MSE/MAE only)
  knn-handcrafted k nearest training spots by Euclidean distance of the 27 standardised colour/texture features
                  (cmrcnet.models.handcrafted), k chosen on validation spots
  cmrcnet-scratch CMRCNet trained end to end from random initialisation (the paper's setting), SCRATCH_EPOCHS
  cmrcnet-ssl     encoder pretrained with `cmrcnet pretrain` (SimCLR) on the slides of the fold's TRAINING
                  sections plus B4 for loso (never the test section: inductive), then frozen; heads trained
  +hc             handcrafted features fused into the image embedding
  cmrcnet-rand+hc frozen RANDOM encoder + handcrafted features (isolates what pretraining adds)
  bleep-ssl+hc, regression-ssl+hc: the baselines' objectives on the same frozen pretrained encoder + features

Tuning: the only tuned setting is the retrieval k (kNN and retrieval methods), chosen per fold from
{5, 10, 20, 50} on the validation spots of the TRAINING sections (20% held out by the trainer, retrieving from
the other 80%). The test section is never used for any choice. Everything else is fixed before running.

Markers: ERBB2, ESR1, PGR, KRT19, GRB7 (HER2 amplicon, hormone receptors, luminal keratin; the markers used by
the her2st paper, Andersson et al. Nat Commun 2021, and by CMRCNet's marker analysis), added to the genes with
`include`.

Writes benchmarks/results/her2st_accuracy.json and .md (or *_quick.* with --quick), with command, commit,
machine, wall time, and the pretraining recipe, tiles and time of every encoder.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cmrcnet.atomic import write_json, write_text
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.spots import load_spot_table
from cmrcnet.evaluation.evaluate import evaluate_predictions
from cmrcnet.inference.predict import predict_samples
from cmrcnet.models.handcrafted import patch_features
from cmrcnet.run.config import load_run_config
from cmrcnet.run.load import load_trained_model
from cmrcnet.runtime import autocast_context
from cmrcnet.training.pretrain import PretrainConfig, SlideSource, pretrain_encoder
from cmrcnet.training.spots import augment
from cmrcnet.workflows.train import train_run

from _machine import git_commit, machine_info

HERE = Path(__file__).resolve().parent
MARKERS = ["ERBB2", "ESR1", "PGR", "KRT19", "GRB7"]
C_SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
OTHER = "B4"
K_GRID = (5, 10, 20, 50)
SCRATCH_EPOCHS = 12
FROZEN_EPOCHS = 20
PRETRAIN = dict(n_tiles=4000, epochs=4)

FROZEN_LR = 5e-4  # heads-only training: a larger step than the end-to-end 1e-4 (fixed in advance, not tuned)
# variant -> (method, encoder source "none" | "ssl" | "random", freeze, handcrafted, epochs)
VARIANTS: dict[str, tuple[str, str, bool, bool, int]] = {
    "cmrcnet-scratch": ("cmrcnet", "none", False, False, SCRATCH_EPOCHS),
    "cmrcnet-ssl+hc": ("cmrcnet", "ssl", True, True, FROZEN_EPOCHS),
    "bleep-ssl+hc": ("bleep", "ssl", True, True, FROZEN_EPOCHS),
    "regression-ssl+hc": ("regression", "ssl", True, True, FROZEN_EPOCHS),
    # ablations (not in the default list: --variants ... to run them)
    "cmrcnet-ssl": ("cmrcnet", "ssl", True, False, FROZEN_EPOCHS),
    "cmrcnet-rand+hc": ("cmrcnet", "random", True, True, FROZEN_EPOCHS),
}
DEFAULT_VARIANTS = ("cmrcnet-scratch", "cmrcnet-ssl+hc", "bleep-ssl+hc", "regression-ssl+hc")
SETS = ("heg50", "hvg50", "all", "markers")


# ---------------------------------------------------------------------- data
def prepare(her2st: Path, ds: Path, samples: list[str]) -> None:
    from cmrcnet.cli import main

    for sid in samples:
        if (ds / "metadata" / f"{sid}.json").exists():
            continue
        rc = main(["prepare", "--quiet", "--format", "st", "--input", str(her2st), "--sample-id", sid,
                   "--patient", sid[0], "--out", str(ds)])
        if rc != 0:
            raise SystemExit(f"prepare {sid} failed")


def folds(protocols: list[str], quick: bool) -> list[dict]:
    out = []
    if "loso" in protocols:
        tests = ["C2"] if quick else C_SECTIONS
        for test in tests:
            train = [s for s in C_SECTIONS if s != test]
            if quick:
                out.append({"protocol": "loso", "test": test, "train": train[:1], "pretrain_slides": train[:1]})
            else:
                out.append({"protocol": "loso", "test": test, "train": train, "pretrain_slides": [*train, OTHER]})
    if "cross" in protocols and not quick:
        out.append({"protocol": "cross", "test": OTHER, "train": C_SECTIONS, "pretrain_slides": C_SECTIONS})
    return out


def encoder_for(work: Path, her2st: Path, ds: Path, fold: dict, quick: bool) -> Path:
    """The SimCLR encoder of this fold (pretrained once, reused by every seed and variant)."""
    out = work / "encoders" / f"{fold['protocol']}-test-{fold['test']}"
    if (out / "encoder.json").exists():
        return out
    data = PreparedDataset(ds)
    sources = [SlideSource(her2st / "images" / f"{s}.jpg", float(data.metadata(s)["pixel_size_um"]))
               for s in fold["pretrain_slides"]]
    recipe = dict(n_tiles=128, epochs=1) if quick else PRETRAIN
    cfg = PretrainConfig(encoder="tiny" if quick else "cpu", **recipe)
    pretrain_encoder(sources, out, cfg, progress=False,
                     command=f"her2st_accuracy pretrain {fold['pretrain_slides']} {recipe}")
    return out


def random_encoder(work: Path, preset: str) -> Path:
    """A 'pretrained' folder holding a randomly initialised encoder (seed 0), for the rand+hc control."""
    from safetensors.torch import save_file

    from cmrcnet.models.config import ModelConfig
    from cmrcnet.models.encoders import build_image_encoder
    from cmrcnet.training.pretrain import ARCH_FIELDS, ENCODER_FORMAT

    out = work / "encoders" / f"random-{preset}"
    if (out / "encoder.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    mcfg = ModelConfig.from_preset(preset, n_genes=1)
    enc = build_image_encoder(mcfg)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(out / "encoder.safetensors"))
    write_json(out / "encoder.json", {
        "format": ENCODER_FORMAT, "encoder_preset": preset, "model": {k: getattr(mcfg, k) for k in ARCH_FIELDS},
        "fov_um": 112.0, "pretraining": {"objective": "none (random initialisation, seed 0)", "transductive": False},
    })
    return out


# ---------------------------------------------------------------------- k on validation spots
def _val_split(run: Path) -> tuple[dict, dict]:
    spots = json.loads((run / "spots.json").read_text())
    return spots["train"], spots["validation"]


def _pcc_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(0) / den
    return np.where(den > 1e-9, r, np.nan)


def _val_score(pred: np.ndarray, true: np.ndarray, val_sections: np.ndarray, heg: np.ndarray) -> float:
    """Mean over validation sections of the mean PCC over the HEG genes (columns `heg`)."""
    scores = []
    for s in np.unique(val_sections):
        rows = val_sections == s
        if rows.sum() >= 3:
            scores.append(np.nanmean(_pcc_cols(pred[rows][:, heg], true[rows][:, heg])))
    return float(np.nanmean(scores)) if scores else float("nan")


def choose_k(dist: torch.Tensor, expr_bank: np.ndarray, expr_val: np.ndarray, val_sections: np.ndarray,
             heg: np.ndarray, *, smaller_is_closer: bool) -> tuple[int, dict]:
    """k from K_GRID with the best validation HEG PCC (retrieval from the training split only)."""
    order = torch.argsort(dist, dim=1, descending=not smaller_is_closer).numpy()
    scores = {}
    for k in K_GRID:
        k_eff = min(k, expr_bank.shape[0])
        pred = expr_bank[order[:, :k_eff]].mean(axis=1)
        scores[k] = _val_score(pred, expr_val, val_sections, heg)
    best = max(scores, key=lambda k: -math.inf if math.isnan(scores[k]) else scores[k])
    return best, scores


def _tables(ds: Path, run: Path, genes: list[str], img_size: int):
    data = PreparedDataset(ds)
    train_spots, val_spots = _val_split(run)
    samples = sorted(set(train_spots) | set(val_spots))
    table = load_spot_table(data, samples, genes, img_size=img_size, target_sum=1e4, progress=False)
    keys = table.keys()
    val_keys = {f"{s}:{b}" for s, bcs in val_spots.items() for b in bcs}
    is_val = np.array([k in val_keys for k in keys])
    return table.subset(np.flatnonzero(~is_val)), table.subset(np.flatnonzero(is_val))


def _heg(expr: np.ndarray, n: int = 50) -> np.ndarray:
    return np.argsort(-expr.mean(0), kind="stable")[:n]


def knn_k_on_validation(ds: Path, run: Path, genes: list[str]) -> tuple[int, dict]:
    tr, va = _tables(ds, run, genes, 224)
    ftr, fva = patch_features(tr.images), patch_features(va.images)
    mu, sd = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
    dist = torch.cdist((fva - mu) / sd, (ftr - mu) / sd)
    e_tr, e_va = tr.expr.numpy(), va.expr.numpy()
    return choose_k(dist, e_tr, e_va, np.array(va.sample_ids), _heg(e_tr), smaller_is_closer=True)


@torch.no_grad()
def retrieval_k_on_validation(ds: Path, run: Path) -> tuple[int, dict]:
    trained = load_trained_model(run)
    model = trained.model
    tr, va = _tables(ds, run, list(trained.genes), trained.model_config.img_size)
    imgs = []
    for i in range(0, len(va), 64):
        x = augment(va.images[i:i + 64], torch.Generator(), flips=False, rot90=False)
        with autocast_context(torch.device("cpu"), "bf16"):
            imgs.append(model.embed_images(x).float())
    q = torch.nn.functional.normalize(torch.cat(imgs), dim=1)
    with autocast_context(torch.device("cpu"), "bf16"):
        b = model.encode_expression(tr.expr).float()
    b = torch.nn.functional.normalize(b, dim=1)
    e_tr, e_va = tr.expr.numpy(), va.expr.numpy()
    return choose_k(q @ b.T, e_tr, e_va, np.array(va.sample_ids), _heg(e_tr), smaller_is_closer=False)


# ---------------------------------------------------------------------- runs
def run_config(variant: str, seed: int, quick: bool, encoder_dir: Path | None):
    method, _source, freeze, hc, epochs = VARIANTS[variant]
    cfg = load_run_config("tiny" if quick else "cpu")
    cfg.method = method
    cfg.train.seed = seed
    cfg.train.epochs = 1 if quick else epochs
    if freeze:
        cfg.train.lr = FROZEN_LR
    cfg.genes.n_top = 250
    cfg.genes.include = list(MARKERS)
    if quick:
        cfg.train.batch_size = 16
    if encoder_dir is not None:
        from cmrcnet.training.pretrain import configure_encoder

        configure_encoder(cfg, str(encoder_dir))
    cfg.model["freeze_encoder"] = freeze
    cfg.model["handcrafted_features"] = hc
    cfg.validate()
    return cfg


def metrics_row(m: dict) -> dict:
    """The test section's numbers from an evaluate_predictions result (one test section per run)."""
    overall = m["overall"]
    row = {f"pcc_{name}": overall.get(f"pcc_{name}", {}).get("mean") for name in SETS}
    for key in ("mse", "mae", "gene_gene_corr"):
        row[key] = overall.get(key, {}).get("mean")
    return row


def evaluate(pred: Path, ds: Path, out: Path, protocol: str) -> dict:
    m = evaluate_predictions(pred, ds, out, markers=MARKERS, protocol=protocol, n_top=50, plots=False)
    return metrics_row(m)


def baseline_predictions(ds: Path, run: Path, ref_pred: Path, out_dir: Path, k_knn: int) -> dict[str, Path]:
    """mean and kNN-handcrafted predictions written like `cmrcnet predict` output (same genes and spots)."""
    ref = ad.read_h5ad(ref_pred)
    genes = list(ref.var_names)
    data = PreparedDataset(ds)
    train_spots, val_spots = _val_split(run)
    samples = sorted(set(train_spots) | set(val_spots))
    train = load_spot_table(data, samples, genes, img_size=224, target_sum=1e4, progress=False)
    test_ids = list(dict.fromkeys(ref.obs["sample_id"].astype(str)))
    # only the test patches are used (a test section may lack a modelled gene, as predict allows)
    test = load_spot_table(data, test_ids, None, img_size=224, target_sum=1e4, progress=False)
    assert test.keys() == list(ref.obs_names), "spot order differs from the reference prediction"
    e_tr = train.expr.numpy()
    ftr, fte = patch_features(train.images), patch_features(test.images)
    mu, sd = ftr.mean(0), ftr.std(0).clamp_min(1e-6)
    nn_idx = torch.cdist((fte - mu) / sd, (ftr - mu) / sd).topk(k_knn, largest=False).indices.numpy()
    preds = {"mean": np.repeat(e_tr.mean(0, keepdims=True), len(test), axis=0),
             "knn-handcrafted": e_tr[nn_idx].mean(axis=1)}
    paths = {}
    for name, x in preds.items():
        a = ad.AnnData(x.astype(np.float32), obs=ref.obs.copy(), var=ref.var.copy(), obsm=dict(ref.obsm))
        info = dict(ref.uns["cmrcnet"])
        info.update(method=name, k=int(k_knn) if name.startswith("knn") else 0, weighting="mean",
                    run_dir="", checkpoint="", weights="")
        a.uns["cmrcnet"] = info
        paths[name] = out_dir / f"pred_{name}.h5ad"
        a.write_h5ad(paths[name])
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--her2st", type=Path, default=HERE.parent.parent / "shared" / "data" / "her2st")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cmrcnet_her2st_accuracy"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--protocols", default="loso,cross")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--tests", help="only the folds testing these sections (comma-separated), e.g. to split the "
                    "work over processes; combine their result files with --merge")
    ap.add_argument("--merge", nargs="+", type=Path, help="combine result JSON files of earlier runs and exit")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--quick", action="store_true", help="1 fold (train C3, test C2), tiny model, 1 seed, 1 epoch")
    ap.add_argument("--out", type=Path, help="results stem (default benchmarks/results/her2st_accuracy[_quick])")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        return merge(args.merge, args.out or HERE / "results" / "her2st_accuracy")
    if not (args.her2st / "counts").is_dir():
        print(f"her2st data not found at {args.her2st}; nothing to do", file=sys.stderr)
        return 2
    t_start = time.time()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    if args.quick:
        variants = ["cmrcnet-scratch", "cmrcnet-ssl+hc"]
    protocols = args.protocols.split(",")
    stem = args.out or HERE / "results" / ("her2st_accuracy_quick" if args.quick else "her2st_accuracy")
    work = args.work / ("quick" if args.quick else "full")
    ds = work / "ds"
    plan = folds(protocols, args.quick)
    if args.tests:
        plan = [f for f in plan if f["test"] in args.tests.split(",")]
    prepare(args.her2st, ds, sorted({s for f in plan for s in [*f["train"], f["test"], *f["pretrain_slides"]]}))
    results: list[dict] = []
    encoders: dict[str, dict] = {}

    def write_results(complete: bool) -> None:
        summary = summarise(results)
        record = {
            "benchmark": "her2st_accuracy",
            "quick": args.quick,
            "complete": complete,
            "command": " ".join(["python", "benchmarks/her2st_accuracy.py", *map(shlex.quote, sys.argv[1:])]),
            "commit": git_commit(),
            "machine": machine_info(),
            "wall_seconds": round(time.time() - t_start, 1),
            "seeds": seeds,
            "markers": MARKERS,
            "k_grid": list(K_GRID),
            "variants": {v: dict(zip(("method", "encoder", "frozen", "handcrafted", "epochs"),
                                     (*VARIANTS[v][:4], 1 if args.quick else VARIANTS[v][4]), strict=True))
                         for v in variants},
            "encoders": encoders,
            "summary": summary,
            "runs": results,
        }
        write_json(Path(f"{stem}.json"), record)
        write_text(Path(f"{stem}.md"), markdown(record))

    # seed-major: every fold gets every variant with the first seed before any second seed is run, so a run cut
    # short still covers all folds (the result files say which runs exist)
    for seed_index, seed in enumerate(seeds):
        for fold in plan:
            fold_dir = work / "runs" / f"{fold['protocol']}-test-{fold['test']}"
            fold_dir.mkdir(parents=True, exist_ok=True)
            ssl_dir = encoder_for(work, args.her2st, ds, fold, args.quick)
            encoders[f"{fold['protocol']}-test-{fold['test']}"] = json.loads((ssl_dir / "encoder.json").read_text())
            first_run = None
            for variant in variants:
                source = VARIANTS[variant][1]
                enc = {"none": None, "ssl": ssl_dir, "random": None}[source]
                if source == "random":
                    enc = random_encoder(work, "tiny" if args.quick else "cpu")
                rdir = fold_dir / f"{variant}-seed{seed}"
                if not (rdir / "run.json").exists() or json.loads((rdir / "run.json").read_text()).get(
                        "status") != "complete":
                    if rdir.exists():
                        import shutil

                        shutil.rmtree(rdir)
                    cfg = run_config(variant, seed, args.quick, enc)
                    cfg.train.feature_cache = str(work / "feature_cache")
                    train_run(data_dir=ds, train_samples=fold["train"], out_dir=rdir, config=copy.deepcopy(cfg),
                              progress=False, command=f"her2st_accuracy {variant} seed {seed}")
                t_train = sum(float(line.split(",")[2]) for line in
                              (rdir / "metrics.csv").read_text().splitlines()[1:])  # epochs' seconds
                k, kscores = (None, {})
                if VARIANTS[variant][0] != "regression":
                    k, kscores = retrieval_k_on_validation(ds, rdir)
                pred = rdir / "pred.h5ad"
                predict_samples(rdir, ds, [fold["test"]], pred, k=k, progress=False)
                first_run = first_run or rdir
                for protocol in ["strict", "paper"] if fold["protocol"] == "loso" else ["strict"]:
                    row = evaluate(pred, ds, rdir / f"eval_{protocol}", protocol)
                    row.update(protocol=fold["protocol"] if protocol == "strict" else "paper",
                               test=fold["test"], method=variant, seed=seed, k=k,
                               k_validation=kscores, train_seconds=round(t_train, 1))
                    results.append(row)
                    print(json.dumps({k2: v for k2, v in row.items() if k2 != "k_validation"}), flush=True)
            if seed_index == 0:  # baselines (deterministic: one row per fold)
                genes = json.loads((first_run / "genes.json").read_text())["genes"]
                k_knn, kscores = knn_k_on_validation(ds, first_run, genes)
                paths = baseline_predictions(ds, first_run, first_run / "pred.h5ad", fold_dir, k_knn)
                for name, pred in paths.items():
                    for protocol in ["strict", "paper"] if fold["protocol"] == "loso" else ["strict"]:
                        row = evaluate(pred, ds, fold_dir / f"eval_{name}_{protocol}", protocol)
                        row.update(protocol=fold["protocol"] if protocol == "strict" else "paper",
                                   test=fold["test"], method=name, seed=None,
                                   k=k_knn if name.startswith("knn") else None,
                                   k_validation=kscores if name.startswith("knn") else {}, train_seconds=0.0)
                        results.append(row)
                        print(json.dumps({k2: v for k2, v in row.items() if k2 != "k_validation"}), flush=True)
            write_results(complete=False)
    write_results(complete=True)
    print(Path(f"{stem}.md").read_text())
    return 0


def merge(paths: list[Path], stem: Path) -> int:
    """One result file from several partial ones (e.g. folds run in parallel processes)."""
    records = [json.loads(p.read_text()) for p in paths]
    rec = dict(records[0])
    unique = {(r["protocol"], r["test"], r["method"], r["seed"]): r for x in records for r in x["runs"]}
    rec["runs"] = list(unique.values())  # a run present in several files (re-evaluated) counts once
    rec["encoders"] = {k: v for x in records for k, v in x["encoders"].items()}
    rec["variants"] = {k: v for x in records for k, v in x["variants"].items()}
    rec["seeds"] = sorted({s for x in records for s in x["seeds"]})
    rec["complete"] = all(x["complete"] for x in records)
    rec["wall_seconds"] = max(x["wall_seconds"] for x in records)
    rec["wall_seconds_sum_of_parts"] = round(sum(x["wall_seconds"] for x in records), 1)
    rec["command"] = " && ".join(x["command"] for x in records) + " (merged)"
    rec["merged_from"] = [{"file": str(p), "commit": x["commit"], "machine": x["machine"]}
                          for p, x in zip(paths, records, strict=True)]
    rec["summary"] = summarise(rec["runs"])
    write_json(Path(f"{stem}.json"), rec)
    write_text(Path(f"{stem}.md"), markdown(rec))
    print(Path(f"{stem}.md").read_text())
    return 0


def summarise(results: list[dict]) -> dict:
    """Per protocol x method: mean and sample std over all (fold, seed) rows of each metric."""
    out: dict = {}
    keys = [f"pcc_{s}" for s in SETS] + ["mse", "mae", "gene_gene_corr"]
    for r in results:
        out.setdefault(r["protocol"], {}).setdefault(r["method"], []).append(r)
    summary: dict = {}
    for protocol, by_method in out.items():
        for method, rows in by_method.items():
            stats = {"n_runs": len(rows), "tests": sorted({r["test"] for r in rows})}
            for key in keys:
                vals = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
                stats[key] = {"mean": float(np.mean(vals)) if vals else None,
                              "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None, "n": len(vals)}
            summary.setdefault(protocol, {})[method] = stats
    return summary


def _cell(s: dict) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.3f}" + (f" ± {s['std']:.3f}" if s["std"] is not None else "")


def markdown(rec: dict) -> str:
    lines = [
        f"# her2st accuracy{' (QUICK smoke run: tiny model, 1 epoch; not a result)' if rec['quick'] else ''}"
        + ("" if rec["complete"] else " (PARTIAL: the run had not finished every fold)"),
        "",
        f"Command: `{rec['command']}`  ",
        f"Commit {rec['commit']}, {rec['machine']['cpu']} ({rec['machine']['cores']} cores), torch "
        f"{rec['machine']['torch']}; wall time {rec['wall_seconds'] / 60:.1f} min"
        + (f" (longest of the merged parts; parts together {rec['wall_seconds_sum_of_parts'] / 60:.1f} min, "
           "runs reused from earlier, interrupted attempts are not counted)" if rec.get("merged_from") else "")
        + "; seeds run: "
        f"{sorted({r['seed'] for r in rec['runs'] if r['seed'] is not None})} (the `runs` column counts (test "
        "section, seed) pairs; rows with fewer runs cover fewer sections or seeds, see the per-section table).",
        "",
        "Mean ± sample std over every (test section, seed) run; PCC per gene within the test section, averaged "
        "over the gene set (EVALUATION.md). `mean` predicts a constant, so its PCC is undefined (n/a). "
        "Retrieval k and kNN k chosen on validation spots of the training sections from "
        f"{rec['k_grid']}. Markers: {', '.join(rec['markers'])}.",
        "",
    ]
    titles = {"loso": "Leave-one-section-out, patient C (C2-C6), strict genes",
              "cross": "Cross-patient: train C2-C6, test B4, strict genes",
              "paper": "PAPER PROTOCOL on the leave-one-section-out runs (HEG/HVG chosen on the test section; "
                       "optimistic)"}
    for protocol, by_method in rec["summary"].items():
        lines += [f"## {titles.get(protocol, protocol)}", "",
                  "| method | runs | test sections | HEG-50 PCC | HVG-50 PCC | all-gene PCC | markers PCC | MSE | MAE "
                  "| gene-gene corr |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        order = sorted(by_method, key=lambda m: -(by_method[m]["pcc_heg50"]["mean"] or -9))
        for m in order:
            s = by_method[m]
            lines.append(f"| {m} | {s['n_runs']} | {','.join(s['tests'])} | {_cell(s['pcc_heg50'])} | "
                         f"{_cell(s['pcc_hvg50'])} | "
                         f"{_cell(s['pcc_all'])} | {_cell(s['pcc_markers'])} | {_cell(s['mse'])} | "
                         f"{_cell(s['mae'])} | {_cell(s['gene_gene_corr'])} |")
        lines.append("")
        tests = sorted({r["test"] for r in rec["runs"] if r["protocol"] == protocol})
        lines += ["HEG-50 PCC per test section (mean over the seeds run; n = seeds):", "",
                  "| method | " + " | ".join(tests) + " |", "|---|" + "---|" * len(tests)]
        for m in order:
            cells = []
            for t in tests:
                vals = [r["pcc_heg50"] for r in rec["runs"] if r["protocol"] == protocol and r["method"] == m
                        and r["test"] == t and r["pcc_heg50"] is not None]
                cells.append(f"{np.mean(vals):.3f} (n={len(vals)})" if vals else "")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Variants", ""]
    for v, d in rec["variants"].items():
        lines.append(f"- `{v}`: {d}")
    lines += ["", "## Pretrained encoders (SimCLR, `cmrcnet pretrain`)", ""]
    for name, info in rec["encoders"].items():
        p = info.get("pretraining", {})
        slides = [Path(s["path"]).stem for s in p.get("slides", [])]
        lines.append(f"- {name}: slides {slides}, {p.get('n_tiles')} tiles, transductive "
                     f"{p.get('transductive')}, loss {p.get('loss_first_epoch', float('nan')):.3f} -> "
                     f"{p.get('loss_last_epoch', float('nan')):.3f}, {p.get('wall_seconds')} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("CMRCNET_CACHE", "/tmp/cmrcnet_feature_cache")
    sys.exit(main())
