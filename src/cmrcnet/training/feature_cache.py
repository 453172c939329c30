"""Frozen-encoder mode: the encoder's outputs for every spot, computed once and reused.

With `ModelConfig.freeze_encoder` the encoder never changes during training, so its tokens for each spot (and
each augmentation the run uses: the flips and 90-degree rotations form at most 8 variants) can be computed once.
Training then runs only the heads: no encoder forward or backward pass per step.

The cache lives on disk, one safetensors file per sample, named by a key that hashes
    the encoder's architecture and weights, the sample's uint8 patches (after resizing), the variants and
    whether tokens are pooled,
so a different encoder (e.g. another pretraining run) or re-prepared patches can never reuse stale features.
Default folder: $CMRCNET_CACHE, else $XDG_CACHE_HOME/cmrcnet/features, else ~/.cache/cmrcnet/features.

Colour jitter cannot be applied to cached features; it is ignored (with a warning) in frozen mode.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cmrcnet.atomic import atomic_path
from cmrcnet.data.spots import SpotTable
from cmrcnet.models.handcrafted import handcrafted_features
from cmrcnet.runtime import autocast_context
from cmrcnet.training.spots import augment

logger = logging.getLogger(__name__)

CACHE_FORMAT = "cmrcnet-frozen-features-1"


def default_cache_dir() -> Path:
    if os.environ.get("CMRCNET_CACHE"):
        return Path(os.environ["CMRCNET_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cmrcnet" / "features"


def dihedral_variants(*, flips: bool, rot90: bool) -> list[tuple[int, bool]]:
    """(quarter turns, horizontal flip) pairs covering the augmentations in use; (0, False) first."""
    turns = (0, 1, 2, 3) if rot90 else ((0, 2) if flips else (0,))
    mirrored = (False, True) if flips else (False,)
    return [(k, m) for m in mirrored for k in turns]


def apply_variant(images: torch.Tensor, variant: tuple[int, bool]) -> torch.Tensor:
    """uint8 (B, S, S, 3) under (quarter turns, horizontal flip)."""
    turns, mirrored = variant
    x = images.flip(2) if mirrored else images
    return torch.rot90(x, turns, dims=(1, 2)) if turns else x


def encoder_fingerprint(encoder: torch.nn.Module, architecture: str) -> str:
    """sha256 over the architecture name and every tensor of the encoder's state (names, shapes, bytes)."""
    digest = hashlib.sha256(architecture.encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass
class FrozenFeatures:
    """Row-aligned with a SpotTable: encoder tokens per variant and raw handcrafted features."""

    tokens: torch.Tensor  # (N, V, T, C) bfloat16; T = 1 when pooled
    variants: list[tuple[int, bool]]  # the V variants, identity first
    features: torch.Tensor  # (N, F) float32 raw handcrafted features

    def subset(self, idx: np.ndarray) -> FrozenFeatures:
        t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        return FrozenFeatures(self.tokens[t], self.variants, self.features[t])


@torch.no_grad()
def _compute(
    model: torch.nn.Module,
    images: torch.Tensor,
    variants: list[tuple[int, bool]],
    *,
    pooled: bool,
    batch_size: int,
    device: torch.device,
    precision: str,
    desc: str,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    encoder = model.image_encoder
    was_training = encoder.training
    encoder.eval()
    out_tokens, out_feats = [], []
    steps = range(0, len(images), batch_size)
    for start in tqdm(steps, desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = images[start : start + batch_size]
        per_variant = []
        for v in variants:
            x = augment(apply_variant(chunk, v), torch.Generator(), flips=False, rot90=False).to(device)
            with autocast_context(device, precision):
                tok = encoder(x.contiguous(memory_format=torch.channels_last))  # (b, T, C)
            if pooled:
                tok = tok.float().mean(dim=1, keepdim=True)  # (b, 1, C)
            per_variant.append(tok.to(torch.bfloat16).cpu())
            if v == variants[0]:
                out_feats.append(handcrafted_features(x).cpu())  # (b, F), the same for every variant
        out_tokens.append(torch.stack(per_variant, dim=1))  # (b, V, T, C)
    encoder.train(was_training)
    return torch.cat(out_tokens), torch.cat(out_feats)


def frozen_features(
    model: torch.nn.Module,
    table: SpotTable,
    *,
    variants: list[tuple[int, bool]],
    pooled: bool,
    cache_dir: str | Path | None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = True,
) -> tuple[FrozenFeatures, dict]:
    """Encoder tokens for every spot of `table` under each variant, read from or written to the cache.

    Returns the features and a summary {"cache_dir", "hits", "computed", "key_by_sample"}.
    """
    from safetensors.torch import load_file, save_file

    device = torch.device(device)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    arch = model.config.image_encoder
    fp = encoder_fingerprint(model.image_encoder, arch)
    order: dict[str, list[int]] = {}
    for i, sid in enumerate(table.sample_ids):
        order.setdefault(sid, []).append(i)
    n, v = len(table), len(variants)
    tokens: torch.Tensor | None = None
    feats = torch.zeros(n, 0)
    summary: dict = {"cache_dir": str(cache), "hits": [], "computed": [], "key_by_sample": {}}
    for sid, rows in order.items():
        idx = torch.tensor(rows)
        images = table.images[idx]
        digest = hashlib.sha256(f"{CACHE_FORMAT}|{fp}|{variants}|pooled={pooled}|{precision}".encode())
        digest.update(images.numpy().tobytes())
        key = digest.hexdigest()[:32]
        summary["key_by_sample"][sid] = key
        path = cache / f"{_safe(sid)}-{key}.safetensors"
        loaded = None
        if path.is_file():
            try:
                loaded = load_file(str(path))
                if loaded["tokens"].shape[:2] != (len(rows), v):
                    loaded = None
            except Exception as exc:  # a damaged cache file is recomputed, never trusted
                logger.warning("ignoring unreadable feature cache %s (%s)", path, exc)
                loaded = None
        if loaded is None:
            tok, fe = _compute(
                model,
                images,
                variants,
                pooled=pooled,
                batch_size=batch_size,
                device=device,
                precision=precision,
                desc=f"encoding {sid}",
                progress=progress,
            )
            cache.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"tokens": tok.contiguous(), "features": fe.contiguous()}, str(tmp))
            summary["computed"].append(sid)
        else:
            tok, fe = loaded["tokens"], loaded["features"]
            summary["hits"].append(sid)
        if tokens is None:
            tokens = torch.empty((n, v, *tok.shape[2:]), dtype=torch.bfloat16)
            feats = torch.empty((n, fe.shape[1]), dtype=torch.float32)
        tokens[idx] = tok
        feats[idx] = fe.float()
    if tokens is None:
        tokens = torch.empty((0, v, 1, model.image_encoder.out_dim), dtype=torch.bfloat16)
    logger.info(
        "frozen encoder features: %d spot(s) x %d variant(s); cached %s, computed %s (cache %s)",
        n,
        v,
        summary["hits"] or "none",
        summary["computed"] or "none",
        cache,
    )
    return FrozenFeatures(tokens, variants, feats), summary


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]
