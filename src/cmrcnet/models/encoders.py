"""Image encoders the model can use, and loading pretrained weights into them.

The interface every encoder follows (so a user can add their own, e.g. a pathology foundation model):

    encoder = ARCHITECTURES[name].build(config)   # an nn.Module
    encoder.out_dim                                # int, the token width C
    encoder(images) -> tokens (B, T, C)            # images: normalised float (B, 3, img_size, img_size)

The model mean-pools the tokens for the image embedding and gives all of them to the cross-modal reconstruction.

Registered architectures:
    "vit-cmrcnet"  the paper's ViT (sizes from the ENCODER_PRESETS entry or custom fields of ModelConfig)
    "resnet50"     ResNet-50 (He et al. 2016) in plain PyTorch; parameter names follow torchvision's resnet50, so a
                   torchvision-layout state dict (ImageNet or a pathology self-supervised checkpoint) loads as is.
                   Tokens: the last stage's feature map, one token per cell (7 x 7 = 49 at 224 px), width 2048.

    pathology foundation models (UNI, UNI2-h, H-optimus-0/1, Virchow2, Prov-GigaPath, Phikon, CONCH v1): the
                   vendors' architectures and parameter names (models/foundation); `cmrcnet encoders` lists them.

`load_encoder_weights` loads a state dict from .safetensors or a torch file (always weights_only=True) or a
checkpoint folder holding one, strips a wrapper prefix ("module.", "backbone.", ...) when that makes the names
match, and reports what did not match.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cmrcnet.errors import CheckpointError, ConfigError
from cmrcnet.models.foundation import FOUNDATION_SPECS, FoundationSpec, resolve_weights_path
from cmrcnet.models.foundation.base import FoundationBackbone
from cmrcnet.models.foundation.loading import check_layout, strip_prefix

if TYPE_CHECKING:
    from cmrcnet.models.config import ModelConfig

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- ResNet-50
class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here, as torchvision's "v1.5") -> 1x1 expand, + identity or projected shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, mid_ch: int, stride: int) -> None:
        super().__init__()
        out_ch = mid_ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, mid_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_ch)
        self.conv3 = nn.Conv2d(mid_ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """ResNet with bottleneck blocks; `forward` returns the last feature map as tokens (B, h * w, 2048)."""

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        stages = []
        for i, (blocks, mid) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(Bottleneck(in_ch, mid, stride if j == 0 else 1))
                in_ch = mid * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = in_ch
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # each residual branch starts as (nearly) the identity
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ConfigError(f"images must be (B, 3, H, W) float tensors, got shape {tuple(images.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, h * w, 2048)


# ---------------------------------------------------------------------- registry
@dataclass(frozen=True)
class EncoderArchitecture:
    name: str
    description: str
    build: Callable[[ModelConfig], nn.Module]
    foundation: FoundationSpec | None = None  # a pretrained vendor model (built at its own size; frozen by default)


def _build_vit(config: ModelConfig) -> nn.Module:
    from cmrcnet.models.vit import VisionTransformer

    return VisionTransformer(
        img_size=config.img_size,
        patch_size=config.patch_size,
        width=config.width,
        depth=config.depth,
        heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        dropout=config.dropout,
    )


def _build_resnet50(config: ModelConfig) -> nn.Module:
    if config.img_size < 32:
        raise ConfigError(f"resnet50 needs img_size >= 32 (it downsamples 32x), got {config.img_size}")
    return ResNetEncoder((3, 4, 6, 3))


ARCHITECTURES: dict[str, EncoderArchitecture] = {
    a.name: a
    for a in (
        EncoderArchitecture(
            "vit-cmrcnet", "the paper's Vision Transformer (sizes from the preset)", _build_vit
        ),
        EncoderArchitecture(
            "resnet50", "ResNet-50, torchvision parameter names, 2048-d tokens", _build_resnet50
        ),
        *(
            EncoderArchitecture(spec.name, f"{spec.title}: {spec.architecture}", lambda _c, s=spec: s.build(), spec)
            for spec in FOUNDATION_SPECS.values()
        ),
    )
}


def build_image_encoder(config: ModelConfig) -> nn.Module:
    """The image encoder named by `config.image_encoder`, freshly initialised."""
    try:
        arch = ARCHITECTURES[config.image_encoder]
    except KeyError:
        raise ConfigError(
            f"unknown image encoder {config.image_encoder!r}; choose one of {sorted(ARCHITECTURES)}"
        ) from None
    encoder = arch.build(config)
    if not isinstance(getattr(encoder, "out_dim", None), int):
        raise ConfigError(f"image encoder {arch.name!r} does not declare an integer out_dim")
    return encoder


# ---------------------------------------------------------------------- weights


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a torch checkpoint (weights_only=True; a nested "state_dict",
    "model" or "encoder" entry is used when the file holds a training checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError("encoder weights file not found", path=path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"not a readable safetensors file ({exc})", path=path) from exc
    try:
        try:  # memory-mapped: a multi-gigabyte file is paged in as its tensors are copied, not read up front
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # the legacy (non-zip) format cannot be mapped; anything else is an error
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, refused globals, truncated zip files, ...
        raise CheckpointError(
            f"not a loadable weights file (only plain tensors are accepted: {str(exc).splitlines()[0]})",
            path=path,
        ) from exc
    for key in ("state_dict", "model", "encoder"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError("does not hold a state dict of tensors", path=path)
    return data


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Remove the leading dotted prefix (e.g. "module.backbone.") that makes the most keys match the encoder's
    own names; keys without it are kept as they are."""
    best = strip_prefix(list(state), expected)
    if not best:
        return state
    return {(k[len(best) :] if k.startswith(best) else k): v for k, v in state.items()}


@dataclass
class WeightsReport:
    path: Path
    sha256: str
    loaded: int  # tensors copied into the encoder
    missing: list[str]  # encoder tensors the file lacks (kept at their initial values)
    unexpected: list[str]  # file tensors the encoder has no place for (e.g. a classifier head)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "loaded": self.loaded,
            "missing": self.missing,
            "unexpected": self.unexpected,
        }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_encoder_weights(
    encoder: nn.Module, path: str | Path, *, strict: bool = False, sha256: str | None = None
) -> WeightsReport:
    """Copy the tensors of `path` into `encoder` (names matched after stripping wrapper prefixes).

    A tensor whose shape differs from the encoder's is an error. With `strict`, any missing or unexpected tensor is
    an error too; otherwise they are reported (and logged) and the missing ones keep their initial values. At
    least half of the encoder's tensors must be found, so pointing at the wrong file fails loudly. `sha256`: the
    file's hash when the caller has just checked it (not computed again for the report).
    """
    path = resolve_weights_path(path)
    own = encoder.state_dict()
    state = _strip_prefixes(read_state_dict(path), set(own))
    if isinstance(encoder, FoundationBackbone):  # a vendor model: every tensor but the optional ones is required
        check_layout(
            {k: tuple(v.shape) for k, v in own.items()},
            {k: tuple(v.shape) for k, v in state.items()},
            path=path,
            what=f"this encoder ({type(encoder).__name__})",
            optional=encoder.optional_tensors,
        )
    bad_shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if bad_shapes:
        raise CheckpointError(
            f"weights do not fit this encoder's architecture: {', '.join(bad_shapes[:3])}"
            + (f" and {len(bad_shapes) - 3} more" if len(bad_shapes) > 3 else ""),
            path=path,
        )
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"weights do not match the encoder exactly (missing {missing[:3]}, unexpected {unexpected[:3]})",
            path=path,
        )
    found = len(own) - len(missing)
    if found < max(1, len(own) // 2):
        raise CheckpointError(
            f"only {found} of the encoder's {len(own)} tensors found in the file (e.g. missing {missing[:3]}); "
            "is this the right architecture?",
            path=path,
        )
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(v.to(own[k].dtype))
    if missing:
        logger.warning(
            "%s: %d encoder tensor(s) not in the file keep their initial values", path, len(missing)
        )
    if unexpected:
        logger.info(
            "%s: ignored %d tensor(s) the encoder has no place for (e.g. %s)",
            path,
            len(unexpected),
            unexpected[0],
        )
    return WeightsReport(path, sha256 or file_sha256(path), found, missing, unexpected)
