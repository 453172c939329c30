"""ModelConfig: presets, validation, dict round trip."""

from __future__ import annotations

import json

import pytest

from cmrcnet.errors import ConfigError
from cmrcnet.models import ENCODER_PRESETS, METHODS, ModelConfig


@pytest.mark.parametrize("preset", sorted(ENCODER_PRESETS))
@pytest.mark.parametrize("method", METHODS)
def test_from_preset_copies_the_table(preset: str, method: str) -> None:
    cfg = ModelConfig.from_preset(preset, n_genes=50, method=method)
    assert cfg.encoder == preset
    assert cfg.method == method
    for key, value in ENCODER_PRESETS[preset].items():
        assert getattr(cfg, key) == value


def test_default_config_is_the_paper_setting() -> None:
    cfg = ModelConfig(n_genes=100)
    assert cfg.encoder == "paper"
    assert (cfg.img_size, cfg.patch_size, cfg.width, cfg.depth, cfg.heads) == (224, 32, 768, 8, 8)
    assert cfg.n_tokens == 50
    assert cfg.proj_dim == 256 and cfg.n_expr_tokens == 8 and cfg.mask_keep_prob == 0.5
    assert cfg.share_fusion_weights and not cfg.detach_recon_target and cfg.temperature == 1.0


def test_overriding_an_encoder_field_makes_it_custom() -> None:
    assert ModelConfig.from_preset("tiny", n_genes=5, depth=3).encoder == "custom"
    assert ModelConfig.from_preset("tiny", n_genes=5, depth=1).encoder == "tiny"
    assert ModelConfig.from_preset("tiny", n_genes=5, temperature=0.5).encoder == "tiny"


def test_dict_round_trip_is_plain_json() -> None:
    cfg = ModelConfig.from_preset("tiny", n_genes=7, method="bleep", mask_mode="token", temperature=0.5)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg


def test_from_dict_fills_missing_fields_with_defaults() -> None:
    assert ModelConfig.from_dict({"n_genes": 3}) == ModelConfig(n_genes=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(img_size=30), "img_size 30 is not divisible by patch_size 8"),
        (dict(width=33), "width 33 is not divisible by heads 2"),
        (dict(mask_keep_prob=0.0), r"mask_keep_prob must be in \(0, 1\]"),
        (dict(mask_keep_prob=1.5), r"mask_keep_prob must be in \(0, 1\]"),
        (dict(mask_mode="patch"), "unknown mask_mode 'patch'"),
        (dict(temperature=0.0), "temperature must be positive"),
        (dict(proj_dropout=1.0), r"proj_dropout must be in \[0, 1\)"),
        (dict(depth=0), "depth must be >= 1"),
        (dict(depth=2.0), "depth must be an integer"),
        (dict(fusion_heads=3), "proj_dim 256 is not divisible by fusion_heads 3"),
        (dict(share_fusion_weights="yes"), "share_fusion_weights must be true or false"),
        (dict(encoder="huge"), "unknown encoder preset 'huge'"),
    ],
)
def test_validation_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_preset("tiny", n_genes=5, **kwargs)


def test_unknown_method_and_preset() -> None:
    with pytest.raises(ConfigError, match="unknown method 'clip'"):
        ModelConfig(n_genes=5, method="clip")
    with pytest.raises(ConfigError, match="unknown encoder preset 'large'"):
        ModelConfig.from_preset("large", n_genes=5)
    with pytest.raises(ConfigError, match="n_genes must be >= 1"):
        ModelConfig(n_genes=0)


def test_preset_name_must_match_its_fields() -> None:
    with pytest.raises(ConfigError, match=r"encoder='cpu' but width=768 \(preset 256\)"):
        ModelConfig(n_genes=5, encoder="cpu")


def test_from_dict_rejects_unknown_keys_and_missing_genes() -> None:
    with pytest.raises(ConfigError, match=r"unknown model config key\(s\) \['colour'\]"):
        ModelConfig.from_dict({"n_genes": 5, "colour": "red"})
    with pytest.raises(ConfigError, match="lacks 'n_genes'"):
        ModelConfig.from_dict({"method": "bleep"})
