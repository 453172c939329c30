"""Run configuration: presets, YAML round trip, merging and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.models.config import ENCODER_PRESETS
from cmrcnet.run.config import RUN_PRESETS, RunConfig, TrainConfig, load_run_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", RUN_PRESETS)
def test_presets_are_valid_and_name_their_encoder(name: str) -> None:
    cfg = load_run_config(name)
    assert cfg.encoder == name and cfg.encoder in ENCODER_PRESETS
    model = cfg.model_config(n_genes=7)
    assert (
        model.n_genes == 7 and model.encoder == name and model.img_size == ENCODER_PRESETS[name]["img_size"]
    )


def test_tiny_preset_is_small_and_exact() -> None:
    cfg = load_run_config("tiny")
    assert (cfg.train.batch_size, cfg.train.precision) == (8, "fp32")
    assert cfg.model_config(n_genes=3).img_size == 32


def test_presets_are_fresh_objects() -> None:
    first = load_run_config("tiny")
    first.train.epochs = 99
    assert load_run_config("tiny").train.epochs != 99


@pytest.mark.parametrize("name", RUN_PRESETS)
def test_yaml_round_trip(name: str, tmp_path: Path) -> None:
    cfg = load_run_config(name)
    cfg.train.lr, cfg.train.min_lr = 3e-4, 1e-6  # values PyYAML writes with exponents
    cfg.genes.include = ["ESR1", "ERBB2"]
    cfg.model = {"dropout": 0.1}
    loaded = load_run_config(_write(tmp_path, cfg.to_yaml()))
    assert loaded.to_dict() == cfg.to_dict()
    assert loaded == cfg


def test_from_dict_round_trip() -> None:
    cfg = load_run_config("cpu")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_preset_with_overrides_merges(tmp_path: Path) -> None:
    text = "preset: tiny\ntrain:\n  epochs: 5\n  lr: 1e-3\ngenes:\n  n_top: 40\nmodel:\n  dropout: 0.1\n"
    cfg = load_run_config(_write(tmp_path, text))
    tiny = load_run_config("tiny")
    assert cfg.encoder == "tiny"
    assert (cfg.train.epochs, cfg.train.lr, cfg.genes.n_top) == (5, 1e-3, 40)
    # everything not mentioned keeps the preset's value
    assert cfg.train.batch_size == tiny.train.batch_size and cfg.train.precision == "fp32"
    assert cfg.genes.mode == tiny.genes.mode and cfg.retrieval == tiny.retrieval
    assert cfg.model_config(n_genes=4).dropout == 0.1
    # model overrides merge key by key too: the cpu preset's reconstruction weight survives another override
    cpu = load_run_config(_write(tmp_path, "preset: cpu\nmodel:\n  freeze_encoder: true\n"))
    assert cpu.model == {"recon_weight": 3.0, "freeze_encoder": True}
    assert load_run_config(_write(tmp_path, "preset: cpu\nmodel:\n  recon_weight: 1\n")).model["recon_weight"] == 1


def test_yaml_without_preset_starts_from_the_defaults(tmp_path: Path) -> None:
    cfg = load_run_config(_write(tmp_path, "train:\n  epochs: 3\n"))
    assert cfg.train.epochs == 3 and cfg.encoder == RunConfig().encoder
    assert cfg.train.batch_size == TrainConfig().batch_size


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("trian:\n  epochs: 3\n", r"unknown RunConfig keys \['trian'\]"),
        ("train:\n  epoch: 3\n", r"unknown TrainConfig keys \['epoch'\]"),
        ("genes:\n  top_n: 3\n", r"unknown GeneSelectionConfig keys \['top_n'\]"),
        ("model:\n  widht: 64\n", r"unknown override\(s\) \['widht'\]"),
        ("model:\n  n_genes: 5\n", r"model overrides cannot set \['n_genes'\]"),
        ("preset: huge\n", r"unknown preset 'huge'; choose one of \['paper', 'cpu', 'tiny'\]"),
    ],
)
def test_unknown_keys_are_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_run_config(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("train:\n  lr: fast\n", r"train\.lr: expected float, got 'fast'"),
        ("train:\n  lr: .inf\n", r"train\.lr: expected a finite number, got inf"),
        ("train:\n  epochs: 2.5\n", r"train\.epochs: expected int, got 2\.5"),
        ("train:\n  epochs: true\n", r"train\.epochs: expected int, got True"),
        ("train:\n  augment_flips: 'yes'\n", r"train\.augment_flips: expected bool, got 'yes'"),
        ("train: 5\n", r"expected a mapping for TrainConfig, got int"),
        ("genes:\n  include: ESR1\n", r"genes\.include: expected a list of str, got 'ESR1'"),
        ("encoder: 3\n", r"encoder: expected str, got 3"),
        ("model:\n  width: big\n", r"width must be an integer, got 'big'"),
    ],
)
def test_wrong_types_are_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_run_config(_write(tmp_path, "preset: tiny\n" + text))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("train:\n  lr: -0.001\n", r"learning rate must be positive, got -0\.001"),
        ("train:\n  lr: 0\n", r"learning rate must be positive, got 0"),
        ("train:\n  min_lr: 1.0\n", r"min_lr must be in \[0, lr\]"),
        ("train:\n  batch_size: 8\n  grad_accum: 3\n", r"batch_size must be a multiple of grad_accum"),
        ("train:\n  batch_size: 1\n", r"batch_size must be >= 2 \(contrastive loss\)"),
        ("train:\n  epochs: 0\n", r"epochs must be >= 1, got 0"),
        ("train:\n  val_fraction: 0\n", r"val_fraction must be in \(0, 1\)"),
        (
            "train:\n  precision: fp8\n",
            r"precision must be one of \('auto', 'fp32', 'bf16', 'fp16'\), got 'fp8'",
        ),
        ("train:\n  select: first\n", r"select must be 'best' or 'last'"),
        ("model:\n  img_size: 30\n", r"img_size 30 is not divisible by patch_size 8"),
        ("method: clip\n", r"unknown method 'clip'"),
        ("encoder: huge\n", r"unknown encoder preset 'huge'"),
        ("retrieval:\n  k: 0\n", r"retrieval k must be .auto. or an integer >= 1"),
        ("genes:\n  mode: loose\n", r"gene selection mode must be 'strict' or 'paper'"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_run_config(_write(tmp_path, "preset: tiny\n" + text))


def test_validate_catches_values_set_in_code() -> None:
    cfg = load_run_config("tiny")
    cfg.train.batch_size, cfg.train.grad_accum = 10, 4
    with pytest.raises(ConfigError, match="batch_size must be a multiple of grad_accum"):
        cfg.validate()


@pytest.mark.parametrize(
    ("text", "match"),
    [("[1, 2]\n", "config must be a YAML mapping"), ("a: [1\n", "invalid YAML")],
)
def test_malformed_files_name_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InputFileError, match=match) as info:
        load_run_config(path)
    assert info.value.path == path


def test_neither_preset_nor_file(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"neither a preset \(paper, cpu, tiny\) nor an existing file"):
        load_run_config(tmp_path / "nope.yaml")


def test_saved_yaml_is_plain(tmp_path: Path) -> None:
    data = yaml.safe_load(load_run_config("tiny").to_yaml())
    assert set(data) == {"encoder", "method", "model", "encoder_weights", "train", "genes", "retrieval"}


@pytest.mark.parametrize(("normalised", "rule"), [(True, "reinhard"), (False, "contrast")])
def test_a_run_saved_before_stain_rules_reads_as_it_trained(tmp_path: Path, normalised: bool, rule: str) -> None:
    """A run's config.yaml without `train.stain_rule` comes from before the rule was recorded: a run that trained
    stain-normalised did so by Reinhard's rule; one that did not gets the default, which it never used. A config
    written by hand without the field gets the default."""
    from cmrcnet.data.stain import DEFAULT_STAIN_RULE
    from cmrcnet.run.config import saved_run_config

    assert DEFAULT_STAIN_RULE == "contrast" and RunConfig().train.stain_rule == DEFAULT_STAIN_RULE
    data = RunConfig().to_dict()
    del data["train"]["stain_rule"]
    data["train"]["stain_normalise"] = normalised
    path = _write(tmp_path, yaml.safe_dump(data))
    assert load_run_config(path, saved_run=True).train.stain_rule == rule
    assert saved_run_config(data, source="ckpt").train.stain_rule == rule
    assert load_run_config(path).train.stain_rule == DEFAULT_STAIN_RULE  # by hand: today's default
    data["train"]["stain_rule"] = "contrast"  # a recorded rule is kept
    assert saved_run_config(data, source="ckpt").train.stain_rule == "contrast"


def test_an_unknown_stain_rule_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stain_rule"):
        load_run_config(_write(tmp_path, "train:\n  stain_rule: macenko\n"))


def test_recon_weight_override_reaches_the_model_and_bad_values_are_refused(tmp_path: Path, capsys) -> None:
    """`recon_weight` (API) / `--recon-weight` (CLI) sets the model's factor on the reconstruction term; the
    saved config carries it; zero is refused before anything is written (CLI: exit 2, one line)."""
    from cmrcnet.api import apply_overrides
    from cmrcnet.cli import main

    cfg = apply_overrides(load_run_config("cpu"), recon_weight=3)
    assert cfg.model["recon_weight"] == 3.0 and cfg.model_config(n_genes=5).recon_weight == 3.0
    assert RunConfig.from_dict(yaml.safe_load(cfg.to_yaml())).model_config(n_genes=5).recon_weight == 3.0
    with pytest.raises(ConfigError, match="recon_weight must be positive, got -1"):
        apply_overrides(load_run_config("cpu"), recon_weight=-1)
    with pytest.raises(ConfigError, match="recon_weight must be a finite number, got 'three'"):
        apply_overrides(load_run_config("cpu"), recon_weight="three")
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path), "--train-samples", "a", "--out", str(out), "--recon-weight", "0"]
    with pytest.raises(SystemExit) as exc:  # argparse refuses a non-positive value
        main(argv)
    assert exc.value.code == 2 and "--recon-weight" in capsys.readouterr().err and not out.exists()
