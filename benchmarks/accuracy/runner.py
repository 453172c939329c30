"""Run the folds: prepare, pretrain, train, choose k, predict, evaluate; one row per (section, method, seed)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from cmrcnet.atomic import write_json
from cmrcnet.constants import DEFAULT_FOV_UM
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.evaluation.evaluate import evaluate_predictions
from cmrcnet.run.config import load_run_config
from cmrcnet.workflows.train import train_run

from . import methods as M
from .plan import DEGRADED


# ---------------------------------------------------------------------- data
def prepare(her2st: Path, ds: Path, samples: list[str], work: Path, fov_um: float | None = None) -> None:
    from cmrcnet.cli import main

    # always explicit: `prepare`'s default for legacy ST moved to 224 um; the variants without their own field of
    # view were measured on 112 um patches
    fov = ["--fov-um", f"{DEFAULT_FOV_UM if fov_um is None else fov_um:g}"]
    for sid in samples:
        if (ds / "metadata" / f"{sid}.json").exists():
            continue
        if sid == DEGRADED:
            args = degraded_copy(her2st, work, ds, fov_um=fov_um)
        else:
            args = ["--input", str(her2st)]
        rc = main(["prepare", "--quiet", "--format", "st", *args, *fov, "--sample-id", sid, "--patient", sid[0],
                   "--out", str(ds)])
        if rc != 0:
            raise SystemExit(f"prepare {sid} failed")


def runs_absent(runs: Iterable[Path], ds: Path, work: Path) -> bool:
    """For scripts that read this benchmark's trained runs: True, after saying so on stderr, when a run (its
    run.json) or the prepared dataset `ds` is missing; `work` is the --work the benchmark should be run with."""
    missing = [str(r) for r in runs if not (r / "run.json").is_file()]
    if missing or not ds.is_dir():
        print(f"runs or dataset missing ({missing or ds}); run benchmarks/her2st_accuracy.py --work {work} "
              "first; nothing measured", file=sys.stderr)
        return True
    return False


def variant_ds(ds: Path, variant: str) -> Path:
    """The prepared dataset a variant trains and predicts on: `ds`, or `ds` + `_fov<um>` for a variant with its own
    field of view (the same spots and counts, other patches; prepared by `prepare(..., fov_um=...)`)."""
    fov = M.VARIANTS[variant].fov_um
    return ds if fov is None else ds.parent / f"{ds.name}_fov{fov:g}"


def degraded_copy(her2st: Path, work: Path, ds: Path, target_um: float = 3.4,
                  fov_um: float | None = None) -> list[str]:
    """B4 as a slide from another scanner: about 3.4 um/px, other stain balance, black background, JPEG q70.

    Written under WORK (never the repository). Returns `cmrcnet prepare` arguments for it."""
    from PIL import Image
    from scipy import ndimage

    from cmrcnet.data.tissue import detect_tissue

    Image.MAX_IMAGE_PIXELS = None
    out = work / "degraded"
    out.mkdir(parents=True, exist_ok=True)
    spots = pd.read_csv(her2st / "spots" / "B4_selection.tsv", sep="\t")
    prepare(her2st, ds, ["B4"], work, fov_um)  # its pixel size, estimated from the spot grid
    px = float(PreparedDataset(ds).metadata("B4")["pixel_size_um"])
    factor = target_um / px
    img = Image.open(her2st / "images" / "B4.jpg").convert("RGB")
    small = img.resize((round(img.width / factor), round(img.height / factor)), Image.Resampling.LANCZOS)
    arr = np.asarray(small)
    # background: outside the tissue outline (the project's own tissue detection, closed over ~170 um and
    # hole-filled); pale areas inside the tissue (fat, lumina) stay as they are
    tissue = ndimage.binary_closing(detect_tissue(arr, 1.0, target_um).mask, iterations=25)
    background = ~ndimage.binary_fill_holes(tissue)
    rgb = arr.astype(np.float64) / 255.0
    od = -np.log(np.clip(rgb, 1 / 255, 1.0))  # optical density
    od = od * np.array([1.30, 0.80, 1.15])  # another stain balance (haematoxylin/eosin uptake, scanner)
    rgb = np.exp(-od) ** 0.9
    rgb[background] = 0.02  # black background, as some scanners and exports give
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(out / "B4deg.jpg", quality=70)
    spots["pixel_x"] = spots["pixel_x"] / factor
    spots["pixel_y"] = spots["pixel_y"] / factor
    spots.to_csv(out / "B4deg_selection.tsv", sep="\t", index=False)
    return ["--counts", str(her2st / "counts" / "B4.tsv.gz"), "--spots", str(out / "B4deg_selection.tsv"),
            "--image", str(out / "B4deg.jpg"), "--pixel-size", f"{target_um}"]


# ---------------------------------------------------------------------- encoders
def ssl_encoder(work: Path, ds: Path, her2st: Path, fold: dict, quick: bool) -> Path:
    from cmrcnet.training.pretrain import PretrainConfig, SlideSource, pretrain_encoder

    out = work / "encoders" / fold["name"]
    if (out / "encoder.json").exists():
        return out
    data = PreparedDataset(ds)
    sources = [SlideSource(her2st / "images" / f"{s}.jpg", float(data.metadata(s)["pixel_size_um"]))
               for s in fold["pretrain_slides"]]
    recipe = dict(n_tiles=128, epochs=1) if quick else M.PRETRAIN
    cfg = PretrainConfig(encoder="tiny" if quick else "cpu", **recipe)
    pretrain_encoder(sources, out, cfg, progress=False,
                     command=f"her2st_accuracy pretrain {fold['pretrain_slides']} {recipe}")
    return out


def random_encoder(work: Path, preset: str) -> Path:
    """A 'pretrained' folder holding a randomly initialised encoder (seed 0)."""
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


# ---------------------------------------------------------------------- training
def run_config(variant: str, seed: int, quick: bool, encoder_dir: Path | None, cache: Path):
    v = M.VARIANTS[variant]
    cfg = load_run_config("tiny" if quick else v.preset)
    cfg.method = v.method
    cfg.train.seed = seed
    cfg.train.epochs = 1 if quick else v.epochs
    if v.lr is not None:
        cfg.train.lr = v.lr
    for field, value in v.train:
        setattr(cfg.train, field, value)
    cfg.genes.include = list(M.MARKERS)
    if quick:
        cfg.train.batch_size = 16
    if encoder_dir is not None:
        from cmrcnet.training.pretrain import configure_encoder

        configure_encoder(cfg, str(encoder_dir))
    # every variant at the paper's reconstruction weight unless it names one, so rows keep their meaning when the
    # preset's weight changes (the cpu preset's is 3 since cmrcnet-cpu60-ctx224-rw3)
    cfg.model.update({"recon_weight": 1.0, **dict(v.model)})
    cfg.model["freeze_encoder"] = v.frozen
    cfg.model["handcrafted_features"] = v.handcrafted
    cfg.train.feature_cache = str(cache)
    cfg.validate()
    return cfg


def trained_run(rdir: Path, variant: str, seed: int, fold: dict, ds: Path, enc: Path | None, quick: bool,
                cache: Path, device: str = "cpu") -> float:
    """Train (unless a complete run is there) on `device`; returns the training seconds (sum of the epochs'
    times)."""
    if not complete(rdir):
        shutil.rmtree(rdir, ignore_errors=True)
        config = run_config(variant, seed, quick, enc, cache)
        source = M.VARIANTS[variant].reuse
        if source is not None and complete(rdir.parent / f"{source}-seed{seed}"):
            reused_run(rdir.parent / f"{source}-seed{seed}", rdir, config, ds, fold["train"])
        else:
            train_run(data_dir=ds, train_samples=fold["train"], run_dir=rdir, config=config, progress=False,
                      device=device, command=f"her2st_accuracy {variant} seed {seed}")
    return sum(float(line.split(",")[2]) for line in (rdir / "metrics.csv").read_text().splitlines()[1:])


def complete(rdir: Path) -> bool:
    info = rdir / "run.json"
    return info.is_file() and json.loads(info.read_text()).get("status") == "complete"


# what a reused run leaves behind: the source's bank, k, confidence reference and the benchmark's own outputs are
# made again from the newly selected weights
NOT_REUSED = ("bank.pt", "retrieval_k.json", "confidence_reference.json", "eval_*", "pred_*.h5ad")


def flat(config) -> dict:
    """{"train.select": "best", "model.recon_weight": 3.0, ...}: a RunConfig as one level of fields, its model
    overrides resolved against the preset (an override equal to the preset's value is no difference)."""
    from dataclasses import asdict

    data = config.to_dict()
    model = asdict(config.model_config(n_genes=1))
    return {**{f"{name}.{key}": value for name, part in data.items() if isinstance(part, dict) and name != "model"
               for key, value in part.items()},
            **{name: part for name, part in data.items() if not isinstance(part, dict)},
            **{f"model.{key}": value for key, value in model.items()}}


def reused_run(source: Path, rdir: Path, config, ds: Path, train_samples: list[str]) -> None:
    """`rdir` as the run `config` would train: the complete run `source`, whose config differs from `config` only
    in `M.PREDICTION_FIELDS` (which saved weights predict), copied with `config` saved, its bank built again
    from the weights `config` selects and the retrieval k and confidence reference chosen again with it
    (`cmrcnet.workflows.bank.update_bank`, as `cmrcnet bank` does). Written to a temporary folder, then renamed."""
    from cmrcnet.run.load import load_trained_model
    from cmrcnet.workflows.bank import update_bank

    saved, wanted = flat(load_run_config(source / "config.yaml", saved_run=True)), flat(config)
    other = sorted(key for key in saved | wanted if saved.get(key) != wanted.get(key)
                   and key not in {f"train.{name}" for name in M.PREDICTION_FIELDS})
    if other:
        raise SystemExit(f"{rdir.name}: cannot reuse {source}: its config differs in {other}, not only in "
                         f"{list(M.PREDICTION_FIELDS)}")
    tmp = rdir.with_name(rdir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(*NOT_REUSED))
    (tmp / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    write_json(tmp / "run.json", {**json.loads((tmp / "run.json").read_text()), "reused_from": str(source)})
    update_bank(load_trained_model(tmp), ds, train_samples, action="build", progress=False)
    tmp.rename(rdir)  # complete only once renamed: an interrupted copy stays under the temporary name


# ---------------------------------------------------------------------- evaluation rows
def evaluate_row(pred: ad.AnnData, ds: Path, out: Path) -> dict:
    m = evaluate_predictions(pred, ds, out, markers=M.MARKERS, protocol="strict", n_top=50, plots=False)
    (sid,) = m["test_samples"]
    per = m["per_sample"][sid]
    row = {}
    for name in ("heg50", "hvg50", "markers", "all"):
        s = per["gene_sets"][name]
        row[f"pcc_{name}"] = s["mean_pcc"]
        row[f"pcc_{name}_excl_constant"] = s["mean_pcc_excl_constant"]
        row[f"n_{name}_scored_zero"] = s["n_constant_pred_scored_zero"]
    for key in ("mse", "mae", "spotwise_pcc", "gene_gene_corr"):
        row[key] = per[key]
    row["n_constant"] = per["n_constant_pred"]
    row["n_excluded_true"] = per["n_constant_true"]
    genes = pd.read_csv(out / "genes.csv")
    heg = genes[genes["in_heg50"]]
    row["heg50_genes"] = heg["gene"].tolist()
    row["heg50_pcc"] = [None if ct else (0.0 if math.isnan(r) else float(r))
                        for r, ct in zip(heg["pcc"], heg["constant_true"], strict=True)]
    row["leakage"] = m["leakage"]
    row.update(confidence_row(pred, ds, sid))
    return row


def confidence_row(pred: ad.AnnData, ds: Path, sid: str) -> dict:
    """Retrieval confidence against the actual per-spot error (Spearman; negative = useful), when the
    prediction carries `obs["retrieval_similarity"]` (retrieval methods)."""
    from cmrcnet.data.genes import expression_matrix
    from cmrcnet.inference.confidence import error_correlation

    if "retrieval_similarity" not in pred.obs:
        return {}
    sim = pred.obs["retrieval_similarity"].to_numpy(dtype=np.float64)
    genes = list(pred.var_names)
    counts = PreparedDataset(ds).read_counts(sid)[pred.obs["barcode"].astype(str).tolist()]
    true, missing = expression_matrix(counts, genes, target_sum=1e4, allow_missing=True)
    keep = [j for j, g in enumerate(genes) if g not in set(missing)]
    x = np.asarray(pred.X)[:, keep]
    return {"similarity_mean": float(sim.mean()), "similarity_p5": float(np.percentile(sim, 5)),
            "confidence_error_spearman": error_correlation(sim, x, true[:, keep]),
            "confidence_error_spearman_mse": error_correlation(sim, x, true[:, keep], error="mse")}


def prediction_like(ref: ad.AnnData, x: np.ndarray, method: str, extra: dict) -> ad.AnnData:
    obs = ref.obs.drop(columns=[c for c in ("retrieval_similarity", "neighbour_spread") if c in ref.obs])
    a = ad.AnnData(x.astype(np.float32), obs=obs, var=ref.var.copy(), obsm=dict(ref.obsm))
    info = dict(ref.uns["cmrcnet"])
    info.update(method=method, run_dir="", checkpoint="", weights="", **{k: v for k, v in extra.items()
                                                                          if k in ("k",)})
    a.uns["cmrcnet"] = info
    return a


def git_dirty() -> bool:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True)
        return bool(out.stdout.strip())
    except OSError:
        return False
