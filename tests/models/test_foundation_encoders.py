"""Pathology foundation models: the vendors' state-dict layouts load into our modules, every tensor is consumed, the
outputs have the documented shapes, and a wrong file fails with one line naming it.

The layouts below are written from the vendors' published configurations (timm `VisionTransformer` arguments of
UNI, UNI2-h, H-optimus, Virchow2 and Prov-GigaPath; transformers `ViTModel` for Phikon; mahmoodlab/CONCH
`open_clip_custom` for CONCH), independently of the modules they test. Full-size layouts are compared on the meta
device (no memory); loading and running use reduced width and depth with the same structure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cmrcnet.cli import main
from cmrcnet.errors import CheckpointError
from cmrcnet.models.encoders import ARCHITECTURES, load_encoder_weights
from cmrcnet.models.foundation import FOUNDATION_SPECS, check_weights_file
from cmrcnet.models.foundation.loading import expected_shapes
from cmrcnet.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

FAMILIES = {"uni", "uni2-h", "h-optimus-0", "h-optimus-1", "virchow2", "prov-gigapath", "phikon", "conch-v1"}


def timm_layout(*, dim, depth, patch, grid, hidden, packed, reg, no_embed_class, layer_scale) -> dict:
    """timm VisionTransformer(num_classes=0) state-dict names and shapes."""
    out = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, grid * grid + (0 if no_embed_class else 1 + reg), dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    if reg:
        out["reg_token"] = (1, reg, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        out.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "norm2.weight": (dim,)})
        out.update(
            {b + "norm2.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,)}
        )
        out.update({b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,)})
        out.update({b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,)})
        out.update(
            {b + "mlp.fc2.weight": (dim, hidden // 2 if packed else hidden), b + "mlp.fc2.bias": (dim,)}
        )
        if layer_scale:
            out.update({b + "ls1.gamma": (dim,), b + "ls2.gamma": (dim,)})
    out.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return out


def hf_vit_layout(*, dim, depth, patch, grid, inter) -> dict:
    """transformers ViTModel (with its pooler) state-dict names and shapes."""
    out = {
        "embeddings.cls_token": (1, 1, dim),
        "embeddings.position_embeddings": (1, 1 + grid * grid, dim),
        "embeddings.patch_embeddings.projection.weight": (dim, 3, patch, patch),
        "embeddings.patch_embeddings.projection.bias": (dim,),
        "layernorm.weight": (dim,),
        "layernorm.bias": (dim,),
        "pooler.dense.weight": (dim, dim),
        "pooler.dense.bias": (dim,),
    }
    for i in range(depth):
        b = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            out.update(
                {
                    f"{b}attention.attention.{name}.weight": (dim, dim),
                    f"{b}attention.attention.{name}.bias": (dim,),
                }
            )
        out.update(
            {b + "attention.output.dense.weight": (dim, dim), b + "attention.output.dense.bias": (dim,)}
        )
        out.update({b + "intermediate.dense.weight": (inter, dim), b + "intermediate.dense.bias": (inter,)})
        out.update({b + "output.dense.weight": (dim, inter), b + "output.dense.bias": (dim,)})
        for name in ("layernorm_before", "layernorm_after"):
            out.update({f"{b}{name}.weight": (dim,), f"{b}{name}.bias": (dim,)})
    return out


def conch_layout(*, width, depth, grid, contrast, caption, queries) -> dict:
    """CONCH's `visual` module (timm trunk + attentional poolers), prefix "visual." removed."""
    trunk = timm_layout(
        dim=width, depth=depth, patch=16, grid=grid, hidden=4 * width, packed=False, reg=0, no_embed_class=False,
        layer_scale=False,
    )  # fmt: skip
    out = {f"trunk.{k}": v for k, v in trunk.items()}
    for pool, d, n in (("attn_pool_contrast", contrast, 1), ("attn_pool_caption", caption, queries)):
        out.update({f"{pool}.query": (n, d), f"{pool}.ln_q.weight": (d,), f"{pool}.ln_q.bias": (d,)})
        out.update({f"{pool}.ln_k.weight": (width,), f"{pool}.ln_k.bias": (width,)})
        out.update({f"{pool}.attn.in_proj_bias": (3 * d,), f"{pool}.attn.out_proj.weight": (d, d)})
        out[f"{pool}.attn.out_proj.bias"] = (d,)
        if d == width:  # nn.MultiheadAttention packs q, k, v when they share a width
            out[f"{pool}.attn.in_proj_weight"] = (3 * d, d)
        else:
            out.update({f"{pool}.attn.q_proj_weight": (d, d), f"{pool}.attn.k_proj_weight": (d, width)})
            out[f"{pool}.attn.v_proj_weight"] = (d, width)
    out.update(
        {
            "ln_contrast.weight": (contrast,),
            "ln_contrast.bias": (contrast,),
            "proj_contrast": (contrast, contrast),
        }
    )
    out.update({"ln_caption.weight": (caption,), "ln_caption.bias": (caption,)})
    return out


def vendor_layout(name: str, *, tiny: bool) -> dict:
    """The vendor's layout at full size, or at the reduced size of the registry's `tiny` overrides."""
    if name == "phikon":
        return hf_vit_layout(dim=48, depth=2, patch=16, grid=4, inter=96) if tiny else hf_vit_layout(
            dim=768, depth=12, patch=16, grid=14, inter=3072
        )  # fmt: skip
    if name == "conch-v1":
        if tiny:
            return conch_layout(width=48, depth=2, grid=4, contrast=32, caption=48, queries=8)
        return conch_layout(width=768, depth=12, grid=28, contrast=512, caption=768, queries=256)
    # (dim, depth, patch, mlp ratio, packed SwiGLU, registers, no_embed_class): the vendors' timm arguments
    dim, depth, patch, ratio, packed, reg, nec = {
        "uni": (1024, 24, 16, 4.0, False, 0, False),
        "uni2-h": (1536, 24, 14, 2.66667 * 2, True, 8, True),
        "h-optimus-0": (1536, 40, 14, 2.66667 * 2, True, 4, True),
        "h-optimus-1": (1536, 40, 14, 2.66667 * 2, True, 4, True),
        "virchow2": (1280, 32, 14, 5.3375, True, 4, False),
        "prov-gigapath": (1536, 40, 16, 5.33334, True, 0, False),
    }[name]
    if tiny:
        dim, depth = 48, 2
    grid = 4 if tiny else 224 // patch
    return timm_layout(
        dim=dim, depth=depth, patch=patch, grid=grid, hidden=int(dim * ratio), packed=packed, reg=reg,
        no_embed_class=nec, layer_scale=True,
    )  # fmt: skip


def test_registry_has_every_family_and_architecture_entries() -> None:
    assert set(FOUNDATION_SPECS) == FAMILIES
    for name in FAMILIES:
        assert ARCHITECTURES[name].foundation is FOUNDATION_SPECS[name]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_full_size_layout_is_the_vendors(name: str) -> None:
    shapes, _ = expected_shapes(FOUNDATION_SPECS[name])
    assert shapes == vendor_layout(name, tiny=False)


def _random_state(layout: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.2 * torch.randn(shape, generator=g) for k, shape in layout.items()}


# the ways users keep weights: a torch .bin (with a wrapper prefix), safetensors, a checkpoint folder
FORMATS = ("bin", "safetensors", "folder")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_vendor_file_loads_every_tensor_and_runs(tmp_path: Path, name: str) -> None:
    spec = FOUNDATION_SPECS[name]
    state = _random_state(vendor_layout(name, tiny=True), seed=len(name))
    fmt = FORMATS[sorted(FAMILIES).index(name) % len(FORMATS)]
    prefix = {"conch-v1": "visual.", "uni": "module.", "virchow2": "model."}.get(name, "")
    on_disk = {prefix + k: v for k, v in state.items()}
    extras = (
        {"text.token_embedding.weight": torch.zeros(4, 8), "logit_scale": torch.zeros(())}
        if prefix == "visual."
        else {}
    )
    on_disk.update(extras)
    if fmt == "bin":
        path = tmp_path / "pytorch_model.bin"
        torch.save(on_disk, path)
    else:
        (tmp_path / "snap").mkdir()
        path = tmp_path / "model.safetensors" if fmt == "safetensors" else tmp_path / "snap"
        save_file(on_disk, str(path if fmt == "safetensors" else path / "model.safetensors"))
    encoder = spec.build(**spec.tiny)
    report = load_encoder_weights(encoder, path)
    assert report.missing == [] and sorted(report.unexpected) == sorted(extras)
    assert report.loaded == len(state)
    for k, v in encoder.state_dict().items():  # every tensor of the file is in the module, and nothing else
        assert torch.equal(v, state[k]), k
    encoder.eval()
    side = spec.tiny["img_size"]
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, side, side))
        other = encoder(
            torch.randn(1, 3, side + 2 * (side // 4), side + 2 * (side // 4))
        )  # interpolated pos embed
    width = encoder.out_dim
    assert out.shape == (2, 1, width) and other.shape == (1, 1, width) and torch.isfinite(out).all()
    assert width == (96 if name == "virchow2" else {"conch-v1": 32}.get(name, 48))  # class + mean patch token


def test_phikon_file_without_its_pooler_loads_and_reports_it(tmp_path: Path) -> None:
    spec = FOUNDATION_SPECS["phikon"]
    state = {
        k: v for k, v in _random_state(vendor_layout("phikon", tiny=True), 0).items() if "pooler" not in k
    }
    save_file(state, str(tmp_path / "model.safetensors"))
    report = load_encoder_weights(spec.build(**spec.tiny), tmp_path)
    assert report.missing == ["pooler.dense.bias", "pooler.dense.weight"]


def test_a_file_lacking_a_block_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    spec = FOUNDATION_SPECS["uni"]
    state = {
        k: v for k, v in _random_state(vendor_layout("uni", tiny=True), 0).items() if "blocks.1.mlp" not in k
    }
    torch.save(state, tmp_path / "uni.bin")
    with pytest.raises(
        CheckpointError, match=r"uni.bin: .*first tensor that does not fit is blocks\.1\.mlp\.fc1\.weight"
    ):
        load_encoder_weights(spec.build(**spec.tiny), tmp_path / "uni.bin")


def test_input_is_renormalised_to_the_vendors_constants() -> None:
    spec = FOUNDATION_SPECS["h-optimus-0"]
    enc = spec.build(**spec.tiny)
    x01 = torch.rand(2, 3, 8, 8)
    ours = (x01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    vendor = (x01 - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    assert torch.allclose(enc.renormalise(ours), vendor, atol=1e-5)
    assert FOUNDATION_SPECS["uni"].build(**FOUNDATION_SPECS["uni"].tiny).renormalise(ours) is ours


def test_full_size_check_accepts_the_vendor_layout_without_building_it(tmp_path: Path) -> None:
    # safetensors headers only: the zero-filled tensors are never read into a model
    layout = vendor_layout("phikon", tiny=False)
    save_file({k: torch.zeros(s) for k, s in layout.items()}, str(tmp_path / "model.safetensors"))
    assert check_weights_file(FOUNDATION_SPECS["phikon"], tmp_path) == tmp_path / "model.safetensors"


def _train(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(tmp_path / "data"),
        "--train-samples",
        "A",
        "--out",
        str(tmp_path / "run"),
        *extra,
    ]


def test_wrong_weights_file_exits_2_with_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "virchow2_weights.bin"
    torch.save(_random_state(vendor_layout("virchow2", tiny=True), 0), wrong)  # right names, wrong sizes
    rc = main(_train(tmp_path, "--encoder", "uni", "--encoder-weights", str(wrong)))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert (
        str(wrong) in err and "first tensor that does not fit is cls_token" in err and "Traceback" not in err
    )
    resnet = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(resnet))
    assert main(_train(tmp_path, "--encoder", "uni", "--encoder-weights", str(resnet))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(resnet) in err and "the file has e.g. conv1.weight" in err


def test_foundation_encoder_without_weights_says_where_to_get_them(
    capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    assert main(_train(tmp_path, "--encoder", "virchow2")) == 2
    assert "https://huggingface.co/paige-ai/Virchow2" in capsys.readouterr().err


def test_encoders_command_lists_every_family(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    for name in FAMILIES:
        spec = FOUNDATION_SPECS[name]
        assert (
            f"--encoder {name} --encoder-weights" in out and spec.weights_url in out and spec.licence in out
        )
    assert main(["encoders", "--json"]) == 0
    assert '"embedding": 2560' in capsys.readouterr().out
