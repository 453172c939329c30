"""Self-supervised pretraining (`cmrcnet pretrain`), starting `train` from it, and the frozen-feature cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from cmrcnet.cli import main
from cmrcnet.data.slide_reader import open_slide, read_tile
from cmrcnet.data.spots import load_spot_table
from cmrcnet.data.synthetic import SyntheticConfig, write_synthetic_raw
from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.run.checkpoint import load_checkpoint
from cmrcnet.run.load import load_trained_model
from cmrcnet.training.feature_cache import dihedral_variants, frozen_features
from cmrcnet.training.pretrain import (
    PretrainConfig,
    SlideSource,
    _read_rotated_tile,
    pretrain_encoder,
    sample_tissue_tiles,
)

from training_utils import TRAIN_SAMPLES

UM = 2.0  # micrometres per pixel of the drawn slide
W, H = 400, 300
TISSUE = (40, 240, 60, 220)  # x0, x1, y0, y1 of the tissue rectangle (pixels); the rest is glass


def _slide(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), 246, dtype=np.uint8)
    x0, x1, y0, y1 = TISSUE
    block = rng.integers(0, 2, size=((y1 - y0) // 4, (x1 - x0) // 4))  # 4 px cells of two stains
    block = np.kron(block, np.ones((4, 4), dtype=np.int64))
    img[y0:y1, x0:x1] = np.where(block[..., None] == 1, [120, 60, 160], [230, 140, 190]).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def test_tiles_stay_inside_tissue_at_the_field_of_view(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "s.png")
    fov_um = 40.0  # 20 px
    sample = sample_tissue_tiles(
        [SlideSource(slide, UM)], n_tiles=60, fov_um=fov_um, out_px=16, min_tissue=0.9, seed=1, progress=False
    )
    assert sample.tiles.shape == (60, 16, 16, 3)
    x0, x1, y0, y1 = TISSUE
    half = fov_um / UM / 2
    cx, cy = sample.centers[:, 0], sample.centers[:, 1]
    # >= 90% tissue: the centre is well inside the rectangle (a tile centred on the edge is only 50% tissue)
    assert ((cx > x0 + 0.3 * half) & (cx < x1 - 0.3 * half) & (cy > y0 + 0.3 * half) & (cy < y1 - 0.3 * half)).all()
    glass = (sample.tiles.min(axis=-1) > 240).mean(axis=(1, 2))  # fraction of glass pixels per tile
    assert glass.max() < 0.25
    assert len(np.unique(np.round(sample.angles))) > 30  # random rotations
    assert sample.slides[0]["tiles"] == 60 and sample.slides[0]["pixel_size_um"] == UM


def test_rotated_tile_has_the_field_of_view_of_a_plain_tile(tmp_path: Path) -> None:
    slide = _slide(tmp_path / "s.png")
    with open_slide(slide) as reader:
        plain = read_tile(reader, 0, 140.0, 140.0, 32.0, 32).astype(np.float32)
        turned0 = _read_rotated_tile(reader, 0, 140.0, 140.0, 32.0, 0.0, 32).astype(np.float32)
        turned90 = _read_rotated_tile(reader, 0, 140.0, 140.0, 32.0, 90.0, 32).astype(np.float32)
    assert np.abs(turned0 - plain).mean() < 6  # same place, same scale (resampling differs slightly)
    assert np.abs(turned90 - np.rot90(plain, 1)).mean() < 6  # PIL rotates counter-clockwise


def _raw_synthetic(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    write_synthetic_raw(raw, SyntheticConfig(n_slides=3, n_rows=6, n_cols=6, n_genes=30))
    return raw / "images"


def test_pretraining_loss_decreases_and_the_encoder_folder_is_complete(tmp_path: Path) -> None:
    images = _raw_synthetic(tmp_path)
    cfg = PretrainConfig(encoder="tiny", n_tiles=96, epochs=6, batch_size=32, precision="fp32", lr=2e-3)
    result = pretrain_encoder(
        [SlideSource(images / "synS1.png", 1.0), SlideSource(images / "synS3.png", 1.0, test=True)],
        tmp_path / "enc",
        cfg,
        progress=False,
    )
    assert result.losses[-1] < result.losses[0] - 0.1
    info = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    assert info["pretraining"]["transductive"] is False
    assert [s["path"] for s in info["pretraining"]["slides"]] == [str(images / "synS1.png")]  # test slide left out
    assert info["pretraining"]["n_tiles"] == 96 and info["pretraining"]["wall_seconds"] > 0
    assert info["model"]["img_size"] == 32 and info["encoder_preset"] == "tiny"


def _encoder_dir(tmp_path: Path, *extra: str) -> Path:
    images = _raw_synthetic(tmp_path)
    out = tmp_path / "enc"
    argv = ["pretrain", "--quiet", "--slides", str(images / "synS1.png"), "--test-slides", str(images / "synS2.png")]
    argv += ["--pixel-size", "1.0", "--out", str(out), "--config", "tiny", "--tiles", "48", "--epochs", "1"]
    argv += ["--batch-size", "16", "--precision", "fp32", *extra]
    assert main(argv) == 0
    return out


def test_encoder_from_pretrain_reloads_into_train(tmp_path: Path, synthetic_ds: Path) -> None:
    enc = _encoder_dir(tmp_path, "--include-test-slides")
    run = tmp_path / "run"
    argv = ["train", "--quiet", "--data", str(synthetic_ds), "--train-samples", ",".join(TRAIN_SAMPLES)]
    argv += ["--out", str(run), "--config", "tiny", "--epochs", "2", "--encoder", str(enc), "--freeze-encoder"]
    argv += ["--handcrafted", "--feature-cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    pretrained = load_file(str(enc / "encoder.safetensors"))
    ckpt = load_checkpoint(run / "best.pt")
    trained = ckpt["model"]
    assert ckpt["encoder_ref"]["source"] == "cmrcnet pretrain"  # frozen, from a file: stored by reference
    assert not any(k.startswith("image_encoder.") for k in trained)
    rebuilt = load_trained_model(run).model.state_dict()
    for key, value in pretrained.items():  # frozen: the run's encoder is exactly the pretrained one
        assert torch.equal(rebuilt[f"image_encoder.{key}"], value), key
    meta = json.loads((run / "run.json").read_text())
    assert meta["transductive"] is True  # the encoder saw a test slide; every run from it says so
    assert meta["encoder_init"]["pretraining"]["objective"] == "simclr"
    assert sorted(meta["feature_cache"]["computed"]) == TRAIN_SAMPLES
    assert int(trained["handcrafted.fitted"]) == 1
    assert (run / "bank.pt").is_file()
    # ... and every result made with it says so
    pred, ev = tmp_path / "pred.h5ad", tmp_path / "eval"
    assert main(["predict", "--quiet", "--model", str(run), "--data", str(synthetic_ds), "--samples",
                 TRAIN_SAMPLES[0], "--out", str(pred)]) == 0
    assert main(["evaluate", "--quiet", "--pred", str(pred), "--data", str(synthetic_ds), "--out", str(ev),
                 "--no-plots"]) == 0
    assert json.loads((ev / "metrics.json").read_text())["prediction"]["transductive"] is True
    assert "TRANSDUCTIVE" in (ev / "summary.md").read_text()


def test_pretrained_encoder_of_another_size_is_refused(tmp_path: Path, synthetic_ds: Path, capsys) -> None:
    enc = _encoder_dir(tmp_path)
    info = json.loads((enc / "encoder.json").read_text())
    info["model"]["width"] = 64
    (enc / "encoder.json").write_text(json.dumps(info))
    argv = ["train", "--quiet", "--data", str(synthetic_ds), "--train-samples", ",".join(TRAIN_SAMPLES)]
    argv += ["--out", str(tmp_path / "run"), "--config", "tiny", "--epochs", "1", "--encoder", str(enc)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match this run's model" in err[0] and str(enc) in err[0]


def test_unknown_encoder_is_a_one_line_error(tmp_path: Path, synthetic_ds: Path, capsys) -> None:
    argv = ["train", "--quiet", "--data", str(synthetic_ds), "--train-samples", ",".join(TRAIN_SAMPLES)]
    argv += ["--out", str(tmp_path / "run"), "--config", "tiny", "--encoder", "vgg19"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vgg19" in err[0] and "resnet50" in err[0]
    assert not (tmp_path / "run").exists()


def test_feature_cache_is_reused_and_invalidated_when_the_encoder_changes(tmp_path: Path, synthetic_ds: Path) -> None:
    from cmrcnet.data.dataset import PreparedDataset

    genes = PreparedDataset(synthetic_ds).read_counts(TRAIN_SAMPLES[0]).var_names[:2].tolist()
    table = load_spot_table(PreparedDataset(synthetic_ds), TRAIN_SAMPLES, genes, img_size=32,
                            target_sum=1e4, progress=False)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny", n_genes=2, freeze_encoder=True))
    variants = dihedral_variants(flips=True, rot90=True)
    assert len(variants) == 8 and variants[0] == (0, False)
    kw = dict(variants=variants, pooled=False, cache_dir=tmp_path / "c", progress=False)
    first, s1 = frozen_features(model, table, **kw)
    again, s2 = frozen_features(model, table, **kw)
    assert s1["computed"] == TRAIN_SAMPLES and s2["hits"] == TRAIN_SAMPLES and s2["computed"] == []
    assert torch.equal(first.tokens, again.tokens) and first.tokens.shape[:2] == (len(table), 8)
    with torch.no_grad():
        model.image_encoder.blocks[0].mlp.fc1.weight[0, 0] += 0.5  # a different encoder
    changed, s3 = frozen_features(model, table, **kw)
    assert s3["computed"] == TRAIN_SAMPLES and s3["key_by_sample"] != s1["key_by_sample"]
    assert not torch.equal(changed.tokens, first.tokens)
    pooled, _ = frozen_features(model, table, **{**kw, "pooled": True})
    assert pooled.tokens.shape[2] == 1


def test_train_warns_when_the_encoder_was_pretrained_at_another_field_of_view(
    tmp_path: Path, synthetic_ds: Path, capsys
) -> None:
    """An encoder pretrained on tiles of another scale than the training patches is usable, but the log says so
    and how to pretrain it to match; run.json records the encoder's field of view."""
    from cmrcnet.data.dataset import PreparedDataset
    from cmrcnet.run.encoder_source import encoder_fov_note

    enc = _encoder_dir(tmp_path)
    data_fov = float(PreparedDataset(synthetic_ds).metadata(TRAIN_SAMPLES[0])["fov_um"])
    assert json.loads((enc / "encoder.json").read_text())["fov_um"] == 112.0
    assert encoder_fov_note({"fov_um": data_fov}, data_fov) is None
    assert encoder_fov_note({"source": "weights file"}, data_fov) is None  # nothing recorded: nothing to compare
    info = json.loads((enc / "encoder.json").read_text())
    info["fov_um"] = 2 * data_fov  # as `pretrain --fov-um` twice the patches' field of view writes it
    (enc / "encoder.json").write_text(json.dumps(info))
    run = tmp_path / "run"
    argv = ["train", "--data", str(synthetic_ds), "--train-samples", ",".join(TRAIN_SAMPLES), "--out", str(run)]
    argv += ["--config", "tiny", "--epochs", "1", "--encoder", str(enc), "--freeze-encoder"]
    argv += ["--feature-cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"pretrained on {2 * data_fov:g} um tiles but the training patches are {data_fov:g} um" in err
    assert f"pretrain it again with --fov-um {data_fov:g}" in err  # the CLI names its flag
    assert json.loads((run / "run.json").read_text())["encoder_init"]["fov_um"] == 2 * data_fov
