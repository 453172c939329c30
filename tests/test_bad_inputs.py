"""Bad inputs through the CLI, one table: exit code 2, one line naming the file and the problem, no traceback,
and nothing half-written (outputs absent, or byte-identical to what was there before)."""

from __future__ import annotations

import gzip
import json
import pathlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from cmrcnet.cli import main
from cmrcnet.data import hdf5
from cmrcnet.data.prepare import prepare_sample
from cmrcnet.data.synthetic import SyntheticConfig, make_synthetic_samples, write_synthetic_raw
from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.run.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from cmrcnet.run.config import load_run_config
from cmrcnet.workflows.train import train_run

from sample_factory import make_sample, write_visium_outs

SID = "synS1"
N_DROPPED_GENES = 3  # model genes removed from the "fewGenes" sample


# --- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def short_hdf5_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung libhdf5 is given up on after 3 s here instead of 30 s (the files are tiny)."""
    monkeypatch.setattr(hdf5, "PROBE_SECONDS", 3.0)


@pytest.fixture(scope="module")
def raw_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A her2st-style folder (counts/, spots/, images/) with one synthetic section synS1 (4 x 4 spots)."""
    root = tmp_path_factory.mktemp("raw")
    write_synthetic_raw(root, SyntheticConfig(n_slides=1, n_patients=1, n_rows=4, n_cols=4, n_genes=20))
    return root


@pytest.fixture(scope="module")
def trained_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A prepared dataset (synS1-3, plus the expression-only "fewGenes" lacking some model genes) and a tiny
    run trained for one epoch on synS1 and synS2 (about 10 s)."""
    root = tmp_path_factory.mktemp("trained")
    ds, run = root / "ds", root / "run"
    config = SyntheticConfig(n_slides=3, n_patients=1, n_rows=6, n_cols=6, n_genes=30)
    for s in make_synthetic_samples(config):
        prepare_sample(s, ds, patch_px=32, progress=False)
    cfg = load_run_config("tiny")
    cfg.train.epochs = 1
    train_run(data_dir=ds, train_samples=["synS1", "synS2"], run_dir=run, config=cfg, progress=False)
    genes = json.loads((run / "genes.json").read_text())["genes"]
    few = make_synthetic_samples(config)[2]
    few.counts = few.counts[:, ~few.counts.var_names.isin(genes[:N_DROPPED_GENES])].copy()
    few.sample_id, few.image = "fewGenes", None
    few.counts.obs["sample_id"] = "fewGenes"
    prepare_sample(few, ds, progress=False)
    return ds, run


@dataclass
class Env:
    """What a case may build on; every helper returns fresh copies under the test's tmp_path."""

    tmp: Path
    request: pytest.FixtureRequest

    def raw(self) -> Path:
        dst = self.tmp / "raw"
        if not dst.exists():
            shutil.copytree(self.request.getfixturevalue("raw_template"), dst)
        return dst

    def trained(self) -> tuple[Path, Path]:
        ds, run = self.tmp / "ds", self.tmp / "run"
        if not ds.exists():
            src_ds, src_run = self.request.getfixturevalue("trained_template")
            shutil.copytree(src_ds, ds)
            shutil.copytree(src_run, run)
        return ds, run


@dataclass
class Case:
    argv: list[str]
    message: str  # fragment of the expected error line
    file: str | None  # name of the offending file, which the line must contain
    outputs: list[Path]  # must be unchanged: still absent, or byte-identical
    absent: list[Path] = field(default_factory=list)  # must not exist afterwards (e.g. a marker)


# --- helpers ------------------------------------------------------------------------------------------------
def _prepare_st(env: Env, *extra: str) -> tuple[list[str], Path]:
    out = env.tmp / "prepared"
    argv = ["prepare", "--format", "st", "--sample-id", SID, "--pixel-size", "1", "--patch-px", "32"]
    if not any(a in extra for a in ("--counts", "--input")):
        argv += ["--input", str(env.raw())]
    return [*argv, *extra, "--out", str(out)], out


def _counts_path(env: Env) -> Path:
    return env.raw() / "counts" / f"{SID}.tsv.gz"


def _read_counts(env: Env) -> pd.DataFrame:
    return pd.read_csv(_counts_path(env), sep="\t", index_col=0)


def _write_counts(env: Env, df: pd.DataFrame) -> None:
    with gzip.open(_counts_path(env), "wt") as fh:
        df.to_csv(fh, sep="\t")


def _st_case(env: Env, message: str, file: str | None, *extra: str) -> Case:
    argv, out = _prepare_st(env, *extra)
    return Case(argv, message, file, [out])


def _h5ad(env: Env) -> Path:
    """A valid spatial .h5ad (raw counts, obsm["spatial"]) without pixel size or technology."""
    path = env.tmp / "sample.h5ad"
    make_sample("h5", n_rows=4, n_cols=6).counts.write_h5ad(path)
    return path


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _predict(env: Env, *extra: str, samples: str = "synS3") -> tuple[list[str], Path]:
    ds, run = env.trained()
    out = env.tmp / "pred.h5ad"
    out.write_bytes(b"previous prediction")  # a failed predict must leave it as it was
    return [
        "predict",
        "--model",
        str(run),
        "--data",
        str(ds),
        "--samples",
        samples,
        "--out",
        str(out),
        *extra,
    ], out


def _train(env: Env, *extra: str, out: Path | None = None) -> tuple[list[str], Path]:
    ds, _ = env.trained()
    out = env.tmp / "newrun" if out is None else out
    argv = [
        "train",
        "--data",
        str(ds),
        "--train-samples",
        "synS1,synS2",
        "--out",
        str(out),
        "--config",
        "tiny",
    ]
    return [*argv, *extra], out


def _yaml_config(env: Env, text: str) -> Path:
    path = env.tmp / "bad_config.yaml"
    path.write_text(text)
    return path


class _TouchOnUnpickle:
    """Unpickling this calls Path.touch(marker): a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


# --- the cases ----------------------------------------------------------------------------------------------
def st_missing_counts(env: Env) -> Case:
    counts = env.tmp / "absent_counts.tsv"
    spots = env.raw() / "spots" / f"{SID}_selection.tsv"
    return _st_case(
        env, "ST counts table not found", counts.name, "--counts", str(counts), "--spots", str(spots)
    )


def st_missing_spots(env: Env) -> Case:
    spots = env.tmp / "absent_selection.tsv"
    counts = _counts_path(env)
    return _st_case(
        env, "ST spot selection table not found", spots.name, "--counts", str(counts), "--spots", str(spots)
    )


def st_counts_missing_from_folder(env: Env) -> Case:
    _counts_path(env).unlink()
    return _st_case(env, f"no counts table for section '{SID}' (expected counts/{SID}.tsv.gz", "raw")


def st_no_input_given(env: Env) -> Case:
    out = env.tmp / "prepared"
    return Case(
        ["prepare", "--format", "st", "--out", str(out)], "--format st needs --input DIR", None, [out]
    )


def st_missing_image(env: Env) -> Case:
    return _st_case(env, "H&E image not found", "absent.png", "--image", str(env.tmp / "absent.png"))


def st_missing_input_folder(env: Env) -> Case:
    return _st_case(
        env, "ST data folder not found", "no_such_folder", "--input", str(env.tmp / "no_such_folder")
    )


def st_truncated_counts(env: Env) -> Case:
    _truncate(_counts_path(env), 0.3)
    return _st_case(env, "cannot parse counts table", f"{SID}.tsv.gz")


def st_text_in_counts(env: Env) -> Case:
    df = _read_counts(env).astype(object)
    df.iloc[2, 3] = "twelve"
    _write_counts(env, df)
    return _st_case(env, "non-numeric counts", f"{SID}.tsv.gz")


def st_truncated_selection(env: Env) -> Case:
    path = env.raw() / "spots" / f"{SID}_selection.tsv"
    text = path.read_text()
    path.write_text(text[: len(text) // 2 - 3])  # cut mid-row: the last row misses columns
    return _st_case(env, "has a missing, non-numeric or infinite value in data row", path.name)


def st_corrupt_png(env: Env) -> Case:
    (env.raw() / "images" / f"{SID}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return _st_case(env, "cannot read image", f"{SID}.png")


def st_truncated_tiff(env: Env) -> Case:
    tif = env.tmp / f"{SID}.tif"
    tifffile.imwrite(tif, np.asarray(Image.open(env.raw() / "images" / f"{SID}.png").convert("RGB")))
    _truncate(tif, 0.5)
    return _st_case(env, "cannot decode image", tif.name, "--image", str(tif))


def st_image_smaller_than_spots(env: Env) -> Case:
    p = env.raw() / "images" / f"{SID}.png"
    Image.open(p).resize((100, 100)).save(p)
    return _st_case(env, "spot centres lie outside it", f"{SID}.png")


def st_no_common_spots(env: Env) -> Case:
    df = _read_counts(env)
    df.index = [f"9{i}x9{i}" for i in range(len(df))]
    _write_counts(env, df)
    return _st_case(env, "no spot id in common", f"{SID}.tsv.gz")


def st_duplicated_spot_ids(env: Env) -> Case:
    df = _read_counts(env)
    df.index = [df.index[0], *df.index[:-1]]
    _write_counts(env, df)
    return _st_case(env, "duplicated spot ids", f"{SID}.tsv.gz")


def st_nan_counts(env: Env) -> Case:
    df = _read_counts(env).astype(float)
    df.iloc[1, 1] = np.nan
    _write_counts(env, df)
    return _st_case(env, "counts contain NaN", f"{SID}.tsv.gz")


def st_negative_counts(env: Env) -> Case:
    df = _read_counts(env)
    df.iloc[0, 0] = -3
    _write_counts(env, df)
    return _st_case(env, "counts contain negative values", f"{SID}.tsv.gz")


def st_all_spots_zero(env: Env) -> Case:
    df = _read_counts(env)
    _write_counts(env, df * 0)
    return _st_case(env, "every spot has zero counts", f"{SID}.tsv.gz")


def anndata_truncated(env: Env) -> Case:
    path = _h5ad(env)
    _truncate(path, 0.5)
    out = env.tmp / "prepared"
    argv = ["prepare", "--format", "anndata", "--input", str(path), "--sample-id", "a", "--pixel-size", "1"]
    return Case([*argv, "--out", str(out)], "cannot read AnnData file", path.name, [out])


def anndata_zeroed_string_heap(env: Env) -> Case:
    """Zeros over HDF5's heap of variable-length strings: libhdf5 itself would loop forever reading it."""
    path = _h5ad(env)
    data = bytearray(path.read_bytes())
    heap = data.find(b"GCOL")  # signature of a global heap collection
    assert heap > 0
    data[heap + 16 : heap + 272] = bytes(256)
    path.write_bytes(bytes(data))
    out = env.tmp / "prepared"
    argv = ["prepare", "--format", "anndata", "--input", str(path), "--sample-id", "a", "--pixel-size", "1"]
    return Case([*argv, "--out", str(out)], "corrupt AnnData file: libhdf5 did not finish", path.name, [out])


def anndata_unknown_pixel_size(env: Env) -> Case:
    path = _h5ad(env)
    out = env.tmp / "prepared"
    argv = ["prepare", "--format", "anndata", "--input", str(path), "--sample-id", "a", "--out", str(out)]
    return Case(argv, "no pixel size in the file and the technology", path.name, [out])


def anndata_normalised_only(env: Env) -> Case:
    s = make_sample("h5", n_rows=4, n_cols=6)
    a = s.counts.copy()
    a.X = a.X.multiply(1.0 / a.X.sum(axis=1)).tocsr() * 3.7  # no integers left: not raw counts
    path = env.tmp / "normalised.h5ad"
    a.write_h5ad(path)
    out = env.tmp / "prepared"
    argv = ["prepare", "--format", "anndata", "--input", str(path), "--sample-id", "a", "--pixel-size", "1"]
    return Case([*argv, "--out", str(out)], "no raw counts found", path.name, [out])


def visium_truncated_h5(env: Env) -> Case:
    outs = write_visium_outs(env.tmp / "outs")
    h5 = outs / "filtered_feature_bc_matrix.h5"
    _truncate(h5, 0.5)
    out = env.tmp / "prepared"
    return Case(
        ["prepare", "--format", "visium", "--input", str(outs), "--out", str(out)],
        "cannot read 10x HDF5 matrix",
        h5.name,
        [out],
    )


def visium_matrix_index_out_of_range(env: Env) -> Case:
    outs = write_visium_outs(env.tmp / "outs")
    h5 = outs / "filtered_feature_bc_matrix.h5"
    with h5py.File(h5, "r+") as f:
        f["matrix/indices"][3] = 10**6  # a gene index far past the 5 genes (scipy would write out of bounds)
    out = env.tmp / "prepared"
    return Case(
        ["prepare", "--format", "visium", "--input", str(outs), "--out", str(out)],
        "corrupt sparse 10x matrix",
        h5.name,
        [out],
    )


def visium_bad_positions(env: Env) -> Case:
    outs = write_visium_outs(env.tmp / "outs")
    pos = outs / "spatial" / "tissue_positions.csv"
    pos.write_text("barcode,in_tissue,row\nAAAC0000-1,1,0\n")
    out = env.tmp / "prepared"
    return Case(
        ["prepare", "--format", "visium", "--input", str(outs), "--out", str(out)],
        "tissue positions lack columns",
        pos.name,
        [out],
    )


def hest_missing_metadata(env: Env) -> Case:
    root = env.tmp / "hest"
    (root / "st").mkdir(parents=True)
    make_sample("TENX1").counts.write_h5ad(root / "st" / "TENX1.h5ad")
    out = env.tmp / "prepared"
    return Case(
        ["prepare", "--format", "hest", "--input", str(root), "--sample-id", "TENX1", "--out", str(out)],
        "HEST metadata not found",
        "TENX1.json",
        [out],
    )


def train_truncated_h5ad_in_dataset(env: Env) -> Case:
    argv, out = _train(env)
    _truncate(env.tmp / "ds" / "st" / "synS1.h5ad", 0.5)
    return Case(argv, "cannot read h5ad", "synS1.h5ad", [out])


def train_interrupted_prepare(env: Env) -> Case:
    argv, out = _train(env)
    meta = env.tmp / "ds" / "metadata" / "synS2.json"
    data = json.loads(meta.read_text())
    data["content_id"] = "0" * 32  # metadata of another (interrupted) version than the counts
    meta.write_text(json.dumps(data))
    return Case(argv, "counts do not match metadata/synS2.json (interrupted prepare?)", "synS2.h5ad", [out])


def train_unknown_sample(env: Env) -> Case:
    ds, _ = env.trained()
    out = env.tmp / "newrun"
    argv = [
        "train",
        "--data",
        str(ds),
        "--train-samples",
        "synS1,nope",
        "--out",
        str(out),
        "--config",
        "tiny",
    ]
    return Case(argv, "samples ['nope'] are not in this dataset", ds.name, [out])


def train_missing_dataset(env: Env) -> Case:
    out = env.tmp / "newrun"
    argv = ["train", "--data", str(env.tmp / "nowhere"), "--train-samples", "a", "--out", str(out)]
    return Case(argv, "prepared dataset folder not found", "nowhere", [out])


def config_missing_file(env: Env) -> Case:
    argv, out = _train(env, "--config", str(env.tmp / "absent.yaml"))
    return Case(argv, "config is neither a preset", "absent.yaml", [out])


def config_negative_lr(env: Env) -> Case:
    cfg = _yaml_config(env, "preset: tiny\ntrain:\n  lr: -0.001\n")
    argv, out = _train(env, "--config", str(cfg))
    return Case(argv, "learning rate must be positive", cfg.name, [out])


def config_img_size_not_divisible(env: Env) -> Case:
    cfg = _yaml_config(env, "preset: tiny\nmodel:\n  img_size: 36\n")
    argv, out = _train(env, "--config", str(cfg))
    return Case(argv, "img_size 36 is not divisible by patch_size 8", cfg.name, [out])


def config_unknown_key(env: Env) -> Case:
    cfg = _yaml_config(env, "preset: tiny\ntrain:\n  learning_rate: 0.001\n")
    argv, out = _train(env, "--config", str(cfg))
    return Case(argv, "unknown TrainConfig keys ['learning_rate']", cfg.name, [out])


def config_wrong_type(env: Env) -> Case:
    cfg = _yaml_config(env, "preset: tiny\ntrain:\n  epochs: many\n")
    argv, out = _train(env, "--config", str(cfg))
    return Case(argv, "expected int, got 'many'", cfg.name, [out])


def config_invalid_yaml(env: Env) -> Case:
    cfg = _yaml_config(env, "train: [unclosed\n")
    argv, out = _train(env, "--config", str(cfg))
    return Case(argv, "invalid YAML", cfg.name, [out])


def train_into_existing_run(env: Env) -> Case:
    _, run = env.trained()
    argv, out = _train(env, out=run)
    return Case(argv, "already holds a run; pass --resume", run.name, [out])


def predict_garbage_checkpoint(env: Env) -> Case:
    argv, out = _predict(env)
    (env.tmp / "run" / "best.pt").write_bytes(b"\x80\x02 definitely not a checkpoint")
    return Case(argv, "cannot read checkpoint", "best.pt", [out])


def predict_checkpoint_of_other_model_size(env: Env) -> Case:
    argv, out = _predict(env)
    best = env.tmp / "run" / "best.pt"
    data = load_checkpoint(best)
    data["model_config"] = {**data["model_config"], "width": 64, "heads": 4, "encoder": "custom"}
    torch.manual_seed(0)
    other = build_model(ModelConfig.from_dict(data["model_config"]))
    data["model"] = data["ema"] = other.state_dict()  # a self-consistent checkpoint of a wider model
    save_checkpoint(best, {k: v for k, v in data.items() if k not in ("format", "cmrcnet_version")})
    return Case(argv, "does not match the run's model.json", "best.pt", [out, env.tmp / "run"])


def predict_checkpoint_without_weights(env: Env) -> Case:
    argv, out = _predict(env)
    best = env.tmp / "run" / "best.pt"
    data = load_checkpoint(best)
    keep = ("model_config", "run_config", "epoch")
    save_checkpoint(best, {k: data[k] for k in keep})
    return Case(argv, "checkpoint lacks 'model'", "best.pt", [out])


def predict_malicious_checkpoint(env: Env) -> Case:
    argv, out = _predict(env)
    marker = env.tmp / "pwned"
    torch.save({"format": FORMAT, "x": _TouchOnUnpickle(marker)}, env.tmp / "run" / "best.pt")
    return Case(argv, "refused: the file contains objects other than tensors", "best.pt", [out], [marker])


def predict_unknown_sample(env: Env) -> Case:
    argv, out = _predict(env, samples="synS9")
    return Case(argv, "samples ['synS9'] are not in this dataset", "ds", [out])


def predict_missing_run_folder(env: Env) -> Case:
    out = env.tmp / "pred.h5ad"
    argv = [
        "predict",
        "--model",
        str(env.tmp / "norun"),
        "--data",
        str(env.tmp),
        "--samples",
        "a",
        "--out",
        str(out),
    ]
    return Case(argv, "run folder not found", "norun", [out])


def predict_not_a_run_folder(env: Env) -> Case:
    argv, out = _predict(env)
    (env.tmp / "run" / "config.yaml").unlink()
    return Case(argv, "not a cmrcnet run folder", "run", [out])


def predict_truncated_patches(env: Env) -> Case:
    argv, out = _predict(env)
    _truncate(env.tmp / "ds" / "patches" / "synS3.h5", 0.4)
    return Case(argv, "cannot read patches h5", "synS3.h5", [out])


def bank_add_missing_genes(env: Env) -> Case:
    ds, run = env.trained()
    argv = ["bank", "add", "--model", str(run), "--data", str(ds), "--samples", "fewGenes"]
    return Case(argv, f"{N_DROPPED_GENES} of the model's", "fewGenes.h5ad", [run])


def evaluate_prediction_without_provenance(env: Env) -> Case:
    pred = env.tmp / "foreign.h5ad"
    ad.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(pred)
    out = env.tmp / "eval"
    argv = ["evaluate", "--pred", str(pred), "--data", str(env.tmp), "--out", str(out)]
    return Case(argv, 'not a cmrcnet prediction: no uns["cmrcnet"]', pred.name, [out])


def evaluate_missing_prediction(env: Env) -> Case:
    out = env.tmp / "eval"
    argv = ["evaluate", "--pred", str(env.tmp / "nowhere.h5ad"), "--data", str(env.tmp), "--out", str(out)]
    return Case(argv, "prediction file not found", "nowhere.h5ad", [out])


def slide_all_background(env: Env) -> Case:
    _, run = env.trained()
    slide = env.tmp / "glass.png"
    Image.new("RGB", (400, 300), (245, 245, 245)).save(slide)
    out = env.tmp / "slide_out"
    argv = [
        "predict-slide",
        "--model",
        str(run),
        "--slide",
        str(slide),
        "--pixel-size",
        "2",
        "--out",
        str(out),
    ]
    return Case(argv, "no tissue found", slide.name, [out])


def slide_unknown_pixel_size(env: Env) -> Case:
    _, run = env.trained()
    slide = env.tmp / "tissue.png"
    Image.new("RGB", (400, 300), (200, 120, 170)).save(slide)
    out = env.tmp / "slide_out"
    argv = ["predict-slide", "--model", str(run), "--slide", str(slide), "--out", str(out)]
    return Case(argv, "--pixel-size", slide.name, [out])


CASES: list[Callable[[Env], Case]] = [
    st_missing_counts,
    st_missing_spots,
    st_counts_missing_from_folder,
    st_no_input_given,
    st_missing_image,
    st_missing_input_folder,
    st_truncated_counts,
    st_text_in_counts,
    st_truncated_selection,
    st_corrupt_png,
    st_truncated_tiff,
    st_image_smaller_than_spots,
    st_no_common_spots,
    st_duplicated_spot_ids,
    st_nan_counts,
    st_negative_counts,
    st_all_spots_zero,
    anndata_truncated,
    anndata_zeroed_string_heap,
    anndata_unknown_pixel_size,
    anndata_normalised_only,
    visium_truncated_h5,
    visium_matrix_index_out_of_range,
    visium_bad_positions,
    hest_missing_metadata,
    train_truncated_h5ad_in_dataset,
    train_interrupted_prepare,
    train_unknown_sample,
    train_missing_dataset,
    config_missing_file,
    config_negative_lr,
    config_img_size_not_divisible,
    config_unknown_key,
    config_wrong_type,
    config_invalid_yaml,
    train_into_existing_run,
    predict_garbage_checkpoint,
    predict_checkpoint_of_other_model_size,
    predict_checkpoint_without_weights,
    predict_malicious_checkpoint,
    predict_unknown_sample,
    predict_missing_run_folder,
    predict_not_a_run_folder,
    predict_truncated_patches,
    bank_add_missing_genes,
    evaluate_prediction_without_provenance,
    evaluate_missing_prediction,
    slide_all_background,
    slide_unknown_pixel_size,
]


def _snapshot(path: Path) -> object:
    """None when absent, the bytes of a file, or {relative path: bytes} of every file under a folder."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("setup", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_exits_2_with_one_line(
    setup: Callable[[Env], Case], tmp_path: Path, request: pytest.FixtureRequest, capsys
) -> None:
    case = setup(Env(tmp_path, request))
    before = [_snapshot(p) for p in case.outputs]
    capsys.readouterr()
    rc = main([*case.argv, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"cmrcnet {case.argv[0]}: error: "), err
    assert case.message in lines[0], err
    if case.file is not None:
        assert case.file in lines[0], err
    for path, old in zip(case.outputs, before, strict=True):
        assert _snapshot(path) == old, f"{path} changed (partial output)"
    for path in case.absent:
        assert not path.exists(), f"{path} exists"


# --- beyond the table ---------------------------------------------------------------------------------------
def test_debug_shows_the_traceback(tmp_path: Path, request: pytest.FixtureRequest, capsys) -> None:
    case = st_missing_counts(Env(tmp_path, request))
    assert main([*case.argv, "--debug", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("cmrcnet prepare: error: ")


def test_zero_count_spots_are_dropped_and_reported(
    tmp_path: Path, request: pytest.FixtureRequest, capsys
) -> None:
    env = Env(tmp_path, request)
    df = _read_counts(env)
    df.iloc[[0, 5]] = 0
    _write_counts(env, df)
    argv, out = _prepare_st(env)
    assert main([*argv, "--quiet"]) == 0
    assert "spots dropped: 2 zero-count" in capsys.readouterr().out
    assert ad.read_h5ad(out / "st" / f"{SID}.h5ad").n_obs == len(df) - 2


def test_failed_prepare_keeps_the_previous_version(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    env = Env(tmp_path, request)
    argv, out = _prepare_st(env)
    assert main([*argv, "--quiet"]) == 0
    before = _snapshot(out)
    st_negative_counts(env)
    assert main([*argv, "--quiet"]) == 2
    assert _snapshot(out) == before


def test_bank_add_allow_missing_genes_fills_and_reports(
    tmp_path: Path, request: pytest.FixtureRequest, capsys
) -> None:
    ds, run = Env(tmp_path, request).trained()
    genes = json.loads((run / "genes.json").read_text())["genes"]
    argv = ["bank", "add", "--model", str(run), "--data", str(ds), "--samples", "fewGenes"]
    assert main([*argv, "--allow-missing-genes", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"fewGenes: {N_DROPPED_GENES} genes missing, filled with zeros" in err
    assert all(g in err for g in genes[:N_DROPPED_GENES])
    bank = torch.load(run / "bank.pt", weights_only=True)
    assert "fewGenes" in bank["samples"]
