"""Self-supervised pretraining of the image encoder on unlabelled H&E tiles (`cmrcnet pretrain`).

Sequenced sections give a few hundred spots; the same slides (and any unsequenced ones) hold tens of thousands
of tissue tiles. We sample tiles from all tissue (not only spots), at the model's field of view, at random
positions and random rotations, and train the encoder with SimCLR (Chen et al., ICML 2020): two augmented views
of a tile must be each other's nearest neighbour among all views of the batch (NT-Xent loss).

Why SimCLR: it needs no decoder and no teacher network (one encoder pass per view, the cheapest objective that
learns semantic features), and its augmentations can be chosen for histology. Colour jitter is kept mild on
purpose: stain intensity and hue carry the information that predicts expression (the handcrafted-feature
baseline shows how much), and strong colour invariance would throw it away; geometry (dihedral transforms,
crops of 60-100% of the tile, i.e. a modest change of scale) carries the invariance instead.

Output folder (ENCODER_DIR, the argument of `cmrcnet train --encoder`):
    encoder.safetensors   the encoder's weights
    encoder.json          architecture, field of view, pretraining recipe, slides and tiles used, wall time,
                          whether test slides were included ("transductive")
    pretrain_loss.csv     loss per epoch
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from cmrcnet import __version__
from cmrcnet.atomic import atomic_path, write_json, write_text
from cmrcnet.errors import ConfigError, InputFileError
from cmrcnet.models.config import ENCODER_PRESETS, ModelConfig
from cmrcnet.models.encoders import build_image_encoder, file_sha256
from cmrcnet.models.preprocess import normalise_unit_images
from cmrcnet.run.encoder_source import ENCODER_FORMAT, ENCODER_JSON, ENCODER_WEIGHTS, read_encoder_dir
from cmrcnet.runtime import PRECISION_CHOICES, autocast_context, resolve_precision

logger = logging.getLogger(__name__)

LOSS_FILE = "pretrain_loss.csv"
# ModelConfig fields that define the encoder's architecture (a pretrained encoder fixes them for `train`)
ARCH_FIELDS = ("image_encoder", "img_size", "patch_size", "width", "depth", "heads", "mlp_ratio")


@dataclass
class PretrainConfig:
    """Recipe of `cmrcnet pretrain` (defaults: about 10 minutes on 2 CPU cores with the "cpu" encoder)."""

    encoder: str = "cpu"  # ENCODER_PRESETS entry (the ViT size; must match the later `train --config`)
    image_encoder: str = "vit-cmrcnet"  # architecture (models.encoders.ARCHITECTURES)
    fov_um: float = 112.0  # physical side of a tile (the training patches' field of view)
    n_tiles: int = 4000  # tissue tiles sampled over all slides (in proportion to their tissue area)
    min_tissue: float = 0.5  # fraction of a tile that must be tissue
    epochs: int = 8  # passes over the tiles
    batch_size: int = 64  # tiles per step (2 views each)
    lr: float = 5e-4  # peak AdamW learning rate (linear warm-up over the first epoch, cosine decay)
    weight_decay: float = 0.05
    temperature: float = 0.2  # NT-Xent temperature
    proj_dim: int = 128  # output of the SimCLR projection MLP (discarded after pretraining)
    crop_min: float = 0.6  # smallest random crop, as a fraction of the tile side
    color_jitter: float = 0.05  # per-channel scale/shift strength in [0, 1] colour space (mild on purpose)
    precision: str = "auto"  # see runtime.resolve_precision
    seed: int = 0
    num_threads: int = 0  # CPU threads for torch (0: torch's default)

    def validate(self) -> None:
        checks = [
            (self.encoder in ENCODER_PRESETS, f"unknown encoder preset {self.encoder!r}"),
            (self.fov_um > 0, f"fov_um must be positive, got {self.fov_um}"),
            (self.n_tiles >= 2, f"n_tiles must be >= 2, got {self.n_tiles}"),
            (0 <= self.min_tissue <= 1, f"min_tissue must be in [0, 1], got {self.min_tissue}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (0 < self.crop_min <= 1, f"crop_min must be in (0, 1], got {self.crop_min}"),
            (self.color_jitter >= 0, f"color_jitter must be >= 0, got {self.color_jitter}"),
            (self.precision in PRECISION_CHOICES, f"precision must be one of {PRECISION_CHOICES}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_preset(self.encoder, n_genes=1, image_encoder=self.image_encoder)


# ---------------------------------------------------------------------- tiles
@dataclass
class SlideSource:
    path: Path
    pixel_size_um: float | None = None  # None: from the slide's metadata
    test: bool = False  # a test slide (used only with include_test_slides=True)


@dataclass
class TileSample:
    tiles: np.ndarray  # (N, S, S, 3) uint8
    slide: np.ndarray  # (N,) index into `slides`
    centers: np.ndarray  # (N, 2) tile centres (x, y) in full-resolution pixels
    angles: np.ndarray  # (N,) rotation in degrees
    slides: list[dict]  # per slide: path, pixel size, tissue fraction, tiles drawn


def _read_rotated_tile(reader, level: int, cx: float, cy: float, fov_px: float, angle: float, out_px: int):
    from cmrcnet.data.slide_reader import read_tile

    big = math.ceil(out_px * math.sqrt(2)) + 2  # the rotated square's bounding box, with a margin
    crop = read_tile(reader, level, cx, cy, fov_px * big / out_px, big)  # (big, big, 3)
    rotated = Image.fromarray(crop).rotate(angle, resample=Image.Resampling.BILINEAR)
    lo = (big - out_px) // 2
    return np.asarray(rotated, dtype=np.uint8)[lo : lo + out_px, lo : lo + out_px]


def sample_tissue_tiles(
    slides: list[SlideSource],
    *,
    n_tiles: int,
    fov_um: float,
    out_px: int,
    min_tissue: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> TileSample:
    """Random tissue tiles of side `fov_um` (resampled to `out_px`), at random positions and rotations.

    Tiles are spread over slides in proportion to their tissue area. A tile is accepted when at least
    `min_tissue` of its (unrotated) square is tissue on the slide's tissue mask, so a rotated tile is at least
    that much tissue up to its corners.
    """
    from cmrcnet.data.slide_reader import open_slide, read_thumbnail, resolve_slide_pixel_size
    from cmrcnet.data.tissue import detect_tissue

    if not slides:
        raise ConfigError("pretraining needs at least one slide")
    rng = np.random.default_rng(seed)
    masks, infos = [], []
    for src in slides:  # pass 1: tissue masks, to share the tiles out by tissue area
        with open_slide(src.path) as reader:
            um, um_source = resolve_slide_pixel_size(reader, src.pixel_size_um)
            fov_px = fov_um / um
            thumb, ds = read_thumbnail(reader, max(fov_px / 8, max(reader.dimensions) / 2048, 1.0))
            mask = detect_tissue(thumb, ds, um)
        area = float(mask.mask.sum()) * (ds * um) ** 2  # um^2 of tissue
        masks.append(mask)
        infos.append(
            {
                "path": str(src.path),
                "pixel_size_um": um,
                "pixel_size_source": um_source,
                "tissue_fraction": round(mask.fraction, 4),
                "tissue_mm2": round(area / 1e6, 3),
                "test": src.test,
            }
        )
    areas = np.array([i["tissue_mm2"] for i in infos], dtype=np.float64)
    if not areas.sum() > 0:
        raise InputFileError("no tissue found on any slide", path=slides[0].path)
    quota = np.floor(n_tiles * areas / areas.sum()).astype(int)
    quota[np.argsort(-areas)[: n_tiles - quota.sum()]] += 1
    tiles = np.empty((n_tiles, out_px, out_px, 3), dtype=np.uint8)
    slide_idx, centers, angles = [], [], []
    bar = tqdm(total=n_tiles, desc="sampling tiles", unit="tile", disable=not progress, leave=False)
    n = 0
    for s, (src, mask, info) in enumerate(zip(slides, masks, infos, strict=True)):
        want = int(quota[s])
        info["tiles"] = 0
        if want == 0:
            continue
        fov_px = fov_um / info["pixel_size_um"]
        ys, xs = np.nonzero(mask.mask)
        got, tries = 0, 0
        with open_slide(src.path) as reader:
            level = reader.best_level_for_downsample(max(1.0, fov_px / out_px))
            while got < want and tries < want * 50:
                batch = min(4096, (want - got) * 4)
                pick = rng.integers(0, len(xs), size=batch)
                cx = (xs[pick] + rng.random(batch)) * mask.downsample  # uniform inside the mask pixel
                cy = (ys[pick] + rng.random(batch)) * mask.downsample
                ok = mask.coverage(np.stack([cx, cy], axis=1), fov_px) >= min_tissue
                tries += batch
                for x, y in zip(cx[ok], cy[ok], strict=True):
                    if got >= want:
                        break
                    angle = float(rng.uniform(0.0, 360.0))
                    tiles[n] = _read_rotated_tile(reader, level, x, y, fov_px, angle, out_px)
                    slide_idx.append(s)
                    centers.append((x, y))
                    angles.append(angle)
                    got += 1
                    n += 1
                    bar.update(1)
        info["tiles"] = got
        if got < want:
            logger.warning("%s: only %d of %d tiles are %.0f%% tissue", src.path, got, want, 100 * min_tissue)
    bar.close()
    if n < 2:
        raise InputFileError(f"only {n} tissue tile(s) found", path=slides[0].path)
    return TileSample(
        tiles[:n],
        np.asarray(slide_idx),
        np.asarray(centers, dtype=np.float64).reshape(-1, 2),
        np.asarray(angles),
        infos,
    )


# ---------------------------------------------------------------------- SimCLR
def two_views(
    tiles: torch.Tensor, gen: torch.Generator, *, crop_min: float, color_jitter: float
) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (2B, 3, S, S): two random views of every tile (view i, i + B)."""
    b, s = tiles.shape[0], tiles.shape[1]
    x01 = tiles.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S)
    views = []
    for _ in range(2):
        scale = crop_min + (1 - crop_min) * torch.rand(b, generator=gen)  # crop side / tile side
        shift = (1 - scale)[:, None] * (
            2 * torch.rand(b, 2, generator=gen) - 1
        )  # centre offset in [-1, 1] units
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = scale
        theta[:, 1, 1] = scale
        theta[:, :, 2] = shift
        # random dihedral transform folded into the affine map: flips negate an axis, a quarter turn swaps them
        flip = torch.where(torch.rand(b, 2, generator=gen) < 0.5, -1.0, 1.0)
        theta[:, 0, :2] *= flip[:, :1]
        theta[:, 1, :2] *= flip[:, 1:]
        swap = torch.rand(b, generator=gen) < 0.5
        theta[swap, :, :2] = theta[swap][:, :, [1, 0]]
        grid = F.affine_grid(theta, (b, 3, s, s), align_corners=False)
        v = F.grid_sample(x01, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if color_jitter > 0:
            gain = 1 + color_jitter * (2 * torch.rand(b, 3, 1, 1, generator=gen) - 1)
            bias = 0.5 * color_jitter * (2 * torch.rand(b, 3, 1, 1, generator=gen) - 1)
            v = (v * gain + bias).clamp_(0, 1)
        views.append(normalise_unit_images(v))
    return torch.cat(views).contiguous(memory_format=torch.channels_last)


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR loss of (2B, D) projections whose rows i and i + B are two views of the same tile (float32)."""
    z = F.normalize(z.float(), dim=1)
    n = z.shape[0] // 2
    sim = z @ z.T / temperature  # (2B, 2B)
    sim.fill_diagonal_(float("-inf"))  # a view is not its own positive
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class SimCLR(nn.Module):
    def __init__(self, encoder: nn.Module, proj_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        width = int(encoder.out_dim)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, proj_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images).mean(dim=1))


@dataclass
class PretrainResult:
    out_dir: Path
    losses: list[float]
    seconds: float
    n_tiles: int


def pretrain_encoder(
    slides: list[SlideSource],
    out_dir: str | Path,
    config: PretrainConfig,
    *,
    include_test_slides: bool = False,
    device: str = "cpu",
    progress: bool = True,
    command: str | None = None,
) -> PretrainResult:
    """Sample tissue tiles from `slides`, pretrain the encoder with SimCLR, write ENCODER_DIR."""
    t_start = time.perf_counter()
    config.validate()
    out = Path(out_dir)
    if (out / ENCODER_JSON).exists():
        raise ConfigError("already holds a pretrained encoder; choose another out_dir=", path=out)
    tests = [s for s in slides if s.test]
    if tests and not include_test_slides:
        logger.info("leaving out %d test slide(s) (pass include_test_slides=True to use them)", len(tests))
        slides = [s for s in slides if not s.test]
    if not slides:
        raise ConfigError("no slides to pretrain on")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    mcfg = config.model_config()
    dev = torch.device(device)
    precision = resolve_precision(config.precision, dev, training=True)
    sample = sample_tissue_tiles(
        slides,
        n_tiles=config.n_tiles,
        fov_um=config.fov_um,
        out_px=mcfg.img_size,
        min_tissue=config.min_tissue,
        seed=config.seed,
        progress=progress,
    )
    t_tiles = time.perf_counter() - t_start
    torch.manual_seed(config.seed)
    model = SimCLR(build_image_encoder(mcfg), config.proj_dim).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(dev.type) if precision.precision == "fp16" else None
    tiles = torch.from_numpy(sample.tiles)
    n = len(tiles)
    batch = min(config.batch_size, n)
    steps_per_epoch = n // batch
    total = steps_per_epoch * config.epochs
    gen = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    step = 0
    bar = tqdm(total=total, desc="pretraining", unit="step", disable=not progress, dynamic_ncols=True)
    for epoch in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            lr = config.lr * min(1.0, (step + 1) / max(1, steps_per_epoch))  # warm-up over the first epoch
            lr *= 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
            for g in opt.param_groups:
                g["lr"] = lr
            views = two_views(
                tiles[order[i * batch : (i + 1) * batch]],
                gen,
                crop_min=config.crop_min,
                color_jitter=config.color_jitter,
            ).to(dev)
            with autocast_context(dev, precision.precision):
                z = model(views)
            loss = nt_xent(z, config.temperature)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:  # fp16 (a CUDA GPU without bf16)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            running += float(loss.detach())
            step += 1
            bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{float(loss.detach()):.3f}")
            bar.update(1)
        losses.append(running / max(1, steps_per_epoch))
        logger.info("pretraining epoch %d/%d: loss %.4f", epoch + 1, config.epochs, losses[-1])
    bar.close()
    seconds = time.perf_counter() - t_start
    _write_encoder_dir(
        out,
        model.encoder,
        mcfg,
        config,
        sample,
        losses,
        seconds=seconds,
        tile_seconds=t_tiles,
        transductive=include_test_slides and bool(tests),
        command=command,
        precision=precision.to_dict(),
    )
    return PretrainResult(out, losses, seconds, n)


def _write_encoder_dir(
    out: Path,
    encoder: nn.Module,
    mcfg: ModelConfig,
    config: PretrainConfig,
    sample: TileSample,
    losses: list[float],
    *,
    seconds: float,
    tile_seconds: float,
    transductive: bool,
    command: str | None,
    precision: dict,
) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    weights = out / ENCODER_WEIGHTS
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    write_text(out / LOSS_FILE, "epoch,loss\n" + "".join(f"{i + 1},{v:.6f}\n" for i, v in enumerate(losses)))
    info = {
        "format": ENCODER_FORMAT,
        "cmrcnet_version": __version__,
        "encoder_preset": config.encoder,
        "model": {k: getattr(mcfg, k) for k in ARCH_FIELDS},
        "fov_um": config.fov_um,
        "weights_sha256": file_sha256(weights),
        "pretraining": {
            "objective": "simclr",
            "recipe": dataclasses.asdict(config),
            "n_tiles": len(sample.tiles),
            "slides": sample.slides,
            "transductive": transductive,
            "loss_first_epoch": losses[0],
            "loss_last_epoch": losses[-1],
            "wall_seconds": round(seconds, 1),
            "tile_sampling_seconds": round(tile_seconds, 1),
            "command": command,
            "precision": precision,
        },
    }
    write_json(out / ENCODER_JSON, info)  # written last: its presence marks a complete folder


def configure_encoder(cfg, spec: str | None, weights: str | Path | None = None) -> None:
    """Point a RunConfig at an encoder: `spec` is a registry name ("vit-cmrcnet", "resnet50", "uni", ...; see
    `cmrcnet encoders`) or a folder written by `pretrain_encoder` (whose preset, architecture and weights it then
    uses); `weights` is a .safetensors or torch state-dict file, or a checkpoint folder holding one, for the chosen
    architecture (a plug-in pretrained encoder). A foundation model's encoder is frozen (features cached)."""
    from cmrcnet.models.encoders import ARCHITECTURES
    from cmrcnet.models.foundation import resolve_weights_path

    if spec:
        path = Path(spec)
        if spec in ARCHITECTURES:
            cfg.model["image_encoder"] = spec
        elif path.is_dir() or (path / ENCODER_JSON).exists():
            info = read_encoder_dir(path)
            if info.get("encoder_preset") not in ENCODER_PRESETS:
                raise InputFileError(f"unknown encoder preset {info.get('encoder_preset')!r}", path=path)
            cfg.encoder = info["encoder_preset"]
            cfg.model["image_encoder"] = info["model"]["image_encoder"]
            cfg.encoder_weights = str(path.resolve())
        else:
            raise ConfigError(
                f"encoder={spec!r} is neither an encoder architecture ({', '.join(sorted(ARCHITECTURES))}) nor "
                "a folder written by `cmrcnet pretrain`"
            )
    if weights:
        if cfg.encoder_weights:
            raise ConfigError("give pretrained weights either as an encoder folder or as encoder_weights=")
        path = Path(weights)
        if not path.exists():
            raise InputFileError("encoder weights file not found", path=path)
        cfg.encoder_weights = str(resolve_weights_path(path).resolve())
    _configure_foundation(cfg, weights)


def _configure_foundation(cfg, weights: str | Path | None) -> None:
    """A pathology foundation model (models/foundation) needs its vendor's weights, which are checked against
    its layout here (in a second, before any data is read); its features are frozen and cached by default."""
    from cmrcnet.models.foundation import FOUNDATION_SPECS, check_weights_file

    spec = FOUNDATION_SPECS.get(cfg.model.get("image_encoder", ""))
    if spec is None:
        return
    if not weights:
        raise ConfigError(
            f"encoder={spec.name!r} needs its weights: download {spec.weights_file} from {spec.weights_url} "
            f"({spec.licence}) and pass it as encoder_weights="
        )
    cfg.encoder_weights = str(check_weights_file(spec, weights).resolve())
    cfg.model["freeze_encoder"] = True
