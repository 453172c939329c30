"""Rows derived from saved predictions, without training: spatial smoothing and seed ensembles.

- `<method>+smooth`: the method's prediction averaged with its neighbouring spots' predictions
  (cmrcnet.inference.smoothing, weight 0.5, first ring); applied to baselines too, so comparisons stay fair.
- `<method>-ens`: the mean of the method's predictions over its seeds (and `-ens+smooth`).
Predictions come from the files `run_fold` saves; for runs made before predictions were saved they are made
again from the run folder with the row's k (retrieval is deterministic given the model, bank and k).
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from cmrcnet.data.hdf5 import write_h5ad
from cmrcnet.data.spots import load_spot_table
from cmrcnet.inference.bank import build_bank, load_bank, merge_banks
from cmrcnet.inference.predict import predict_spots
from cmrcnet.inference.smoothing import smooth_neighbours
from cmrcnet.run.load import load_trained_model

from . import runner
from .methods import VARIANTS

SMOOTH = dict(weight=0.5, radius_factor=1.5)


def _base(method: str) -> tuple[str, str]:
    return (method[: -len("+bank")], "+bank") if method.endswith("+bank") else (method, "")


def prediction_path(work: Path, row: dict) -> Path:
    fold_dir = work / "runs" / row["fold"]
    if row["seed"] is None:
        return fold_dir / f"pred_{row['method']}_{row['test']}.h5ad"
    variant, suffix = _base(row["method"])
    return fold_dir / f"{variant}-seed{row['seed']}" / f"pred_{row['test']}{suffix}.h5ad"


def _model_and_bank(work: Path, ds: Path, row: dict, fold: dict):
    """(run folder, trained model, the bank the row retrieved from: None for regression, the run's bank, or it
    plus the fold's expression-only sections for a `+bank` row)."""
    variant, suffix = _base(row["method"])
    rdir = work / "runs" / row["fold"] / f"{variant}-seed{row['seed']}"
    trained = load_trained_model(rdir)
    bank = None
    if VARIANTS[variant].method != "regression":
        bank = load_bank(rdir, trained)
        if suffix:
            bank = merge_banks(bank, build_bank(trained, runner.PreparedDataset(runner.variant_ds(ds, variant)),
                                                fold["extra_bank"],
                                                allow_missing_genes=True, progress=False))
    return rdir, trained, bank


def _remake_trained(work: Path, ds: Path, row: dict, fold: dict) -> ad.AnnData:
    _, trained, bank = _model_and_bank(work, ds, row, fold)
    return predict_spots(trained, bank, runner.variant_ds(ds, _base(row["method"])[0]), [row["test"]], None,
                         k=row["k"], progress=False, smooth=0.0)


def _remake_baselines(work: Path, ds: Path, fold: dict, rows: list[dict], variants: list[str]) -> None:
    from .main import baseline_predictions

    refs = {}
    for r in rows:
        if r["fold"] == fold["name"] and r["seed"] is not None and prediction_path(work, r).exists():
            refs.setdefault(r["test"], ad.read_h5ad(prediction_path(work, r)))
    seed = min(r["seed"] for r in rows if r["fold"] == fold["name"] and isinstance(r["seed"], int))
    trained = load_trained_model(prediction_path(work, next(
        r for r in rows if r["fold"] == fold["name"] and r["seed"] == seed)).parent)
    train = load_spot_table(runner.PreparedDataset(ds), fold["train"], list(trained.genes), img_size=224,
                            target_sum=trained.run_config.genes.target_sum, progress=False)
    for (test, method), (pred, _info) in baseline_predictions(
            fold, train, refs, variants, seed, work / "runs" / fold["name"], ds).items():
        write_h5ad(pred, work / "runs" / fold["name"] / f"pred_{method}_{test}.h5ad")


def ensure_predictions(work: Path, ds: Path, rows: list[dict], folds: dict[str, dict], variants: list[str]) -> None:
    """Save every row's prediction file that is missing (runs made before predictions were saved)."""
    trained_rows = [r for r in rows if r["seed"] is not None and isinstance(r["seed"], int)]
    for r in trained_rows:
        path = prediction_path(work, r)
        if not path.exists():
            write_h5ad(_remake_trained(work, ds, r, folds[r["fold"]]), path)
    for name in sorted({r["fold"] for r in rows if r["seed"] is None}):
        base_rows = [r for r in rows if r["fold"] == name and r["seed"] is None]
        if any(not prediction_path(work, r).exists() for r in base_rows):
            _remake_baselines(work, ds, folds[name], rows, variants)


def derived_rows(work: Path, ds: Path, rows: list[dict], folds: dict[str, dict], variants: list[str],
                 make_row) -> list[dict]:
    """+smooth rows for every saved prediction but `mean`, and -ens / -ens+smooth rows over seeds."""
    base = [r for r in rows if r["method"] != "mean" and (r["seed"] is None or isinstance(r["seed"], int))]
    ensure_predictions(work, ds, base, folds, variants)
    out = []
    groups: dict[tuple, list[ad.AnnData]] = {}
    for r in base:
        pred = ad.read_h5ad(prediction_path(work, r))
        fold = folds[r["fold"]]
        eval_dir = prediction_path(work, r).parent / f"eval_derived_{r['method']}_{r['test']}_{r['seed']}"
        out.append(_smoothed_row(pred, r["method"], r["seed"], fold, r["test"], ds, eval_dir, make_row))
        if r["seed"] is not None:
            groups.setdefault((r["fold"], r["test"], r["method"]), []).append(pred)
    out += stain_rows(work, ds, rows, folds, variants, make_row)
    for (fold_name, test, method), preds in groups.items():
        if len(preds) < 2:
            continue
        fold = folds[fold_name]
        ens = preds[0].copy()
        ens.X = np.mean([np.asarray(p.X) for p in preds], axis=0).astype(np.float32)
        eval_dir = work / "runs" / fold_name / f"eval_derived_{method}-ens_{test}"
        out.append(make_row(fold, test, f"{method}-ens", f"ens{len(preds)}",
                            runner.evaluate_row(ens, ds, eval_dir), derived=f"mean over {len(preds)} seeds"))
        out.append(_smoothed_row(ens, f"{method}-ens", f"ens{len(preds)}", fold, test, ds,
                                 Path(f"{eval_dir}+smooth"), make_row))
    return out


# derived-row suffix -> stain normalisation rule (cmrcnet.data.stain): "+stain" is Reinhard as published (the
# default of `predict` until the "contrast" rule replaced it), "+cstain" the "contrast" rule `predict` now uses
STAIN_SUFFIXES = {"+stain": "reinhard", "+cstain": "contrast"}


def stain_rows(work: Path, ds: Path, rows: list[dict], folds: dict[str, dict], variants: list[str],
               make_row) -> list[dict]:
    """`<method>+stain` and `<method>+cstain` rows on every patient-level fold: test patches colour-normalised
    (slide level, cmrcnet.data.stain; rules in `STAIN_SUFFIXES`) to the fold's training patches before
    prediction; baselines likewise. Each also gets `...+smooth` (what `predict` gives by default: stain
    normalisation, then smoothing)."""
    from cmrcnet.data.stain import lab_stats

    from .main import baseline_encoders, baseline_predictions

    out = []
    for name, fold in folds.items():
        if fold["protocol"] != "patient":
            continue
        mine = [r for r in rows if r["fold"] == name and r["method"] != "mean"]
        if not mine:
            continue
        targets: dict[Path, object] = {}  # prepared dataset -> its training patches' colour statistics
        for r in [r for r in mine if isinstance(r["seed"], int)]:
            variant, suffix = _base(r["method"])
            vds = runner.variant_ds(ds, variant)
            if vds not in targets:
                targets[vds] = lab_stats(load_spot_table(runner.PreparedDataset(vds), fold["train"], None,
                                                         img_size=224, target_sum=1e4, progress=False).images.numpy())
            rdir, trained, bank = _model_and_bank(work, ds, r, fold)
            for tag, rule in STAIN_SUFFIXES.items():
                pred = predict_spots(trained, bank, vds, [r["test"]], None, k=r["k"], progress=False,
                                     stain_target=targets[vds], stain_rule=rule, smooth=0.0)
                out.append(make_row(fold, r["test"], f"{r['method']}{tag}", r["seed"],
                                    runner.evaluate_row(pred, ds, rdir / f"eval_{r['test']}{suffix}{tag}"),
                                    k=r["k"], derived=_stain_how(rule)))
                out.append(_smoothed_row(pred, f"{r['method']}{tag}", r["seed"], fold, r["test"], ds,
                                         rdir / f"eval_{r['test']}{suffix}{tag}+smooth", make_row))
        base = [r for r in mine if r["seed"] is None]
        if base:
            seed = min(r["seed"] for r in mine if isinstance(r["seed"], int))
            refs = {t: ad.read_h5ad(prediction_path(work, next(r for r in mine if r["seed"] == seed and r["test"] == t)))
                    for t in fold["tests"]}
            train = load_spot_table(runner.PreparedDataset(ds), fold["train"], refs[fold["tests"][0]].var_names.tolist(),
                                    img_size=224, target_sum=1e4, progress=False)
            target = lab_stats(train.images.numpy())  # the baselines read `ds`'s patches
            encoders = baseline_encoders(train, variants, seed, work / "runs" / name)  # once for both rules
            for tag, rule in STAIN_SUFFIXES.items():
                for (test, method), (pred, info) in baseline_predictions(
                        fold, train, refs, variants, seed, work / "runs" / name, ds, stain_target=target,
                        stain_rule=rule, encoders=encoders).items():
                    if method == "mean":
                        continue
                    out.append(make_row(fold, test, f"{method}{tag}", None,
                                        runner.evaluate_row(pred, ds, work / "runs" / name / f"eval_{method}_{test}{tag}"),
                                        k=info.get("k"), derived=_stain_how(rule)))
                    out.append(_smoothed_row(pred, f"{method}{tag}", None, fold, test, ds,
                                             work / "runs" / name / f"eval_{method}_{test}{tag}+smooth", make_row))
    return out


def _stain_how(rule: str) -> str:
    return f"test patches colour-normalised to the training patches (rule {rule!r})"


def _smoothed_row(pred: ad.AnnData, method: str, seed, fold: dict, test: str, ds: Path, eval_dir: Path,
                  make_row) -> dict:
    smooth = pred.copy()
    smooth.X = smooth_neighbours(np.asarray(pred.X), np.asarray(pred.obsm["spatial"]), **SMOOTH)
    return make_row(fold, test, f"{method}+smooth", seed, runner.evaluate_row(smooth, ds, eval_dir),
                    derived=f"spatial smoothing {SMOOTH} of {method}")
