"""Where a step's time goes (torch.profiler, grouped by kind of operator), and the models measured."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.flops import model_flops_per_spot
from cmrcnet.runtime import autocast_context

from .common import CPU

PROFILE_GROUPS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "quantized::")),
    ("attention (SDPA)", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("patch convolution", ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution")),
    ("dtype casts / copies", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")),
    ("dropout / masking RNG", ("aten::bernoulli", "aten::native_dropout", "aten::rand", "aten::uniform_")),
    (
        "optimizer (AdamW)",
        ("aten::_foreach", "aten::addcdiv_", "aten::addcmul_", "aten::lerp_", "aten::sqrt"),
    ),
)


def profile_step(fn: Callable[[], Any]) -> dict:
    """Self CPU time of one call of `fn` grouped by kind of op (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    groups = {name: 0.0 for name, _ in PROFILE_GROUPS}
    groups["other"] = 0.0
    for ev in prof.key_averages():
        name = ev.key
        for group, prefixes in PROFILE_GROUPS:
            if name.startswith(prefixes):
                groups[group] += ev.self_cpu_time_total / 1e6
                break
        else:
            if name.startswith("aten::"):
                groups["other"] += ev.self_cpu_time_total / 1e6
    total = sum(groups.values())
    return {
        "wall_seconds_profiled": round(wall, 3),
        "self_seconds": {k: round(v, 3) for k, v in groups.items()},
        "fraction": {k: round(v / total, 3) for k, v in groups.items()} if total else {},
    }


def profile_train(preset: str, precision: str, *, batch: int, genes: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size).contiguous(memory_format=torch.channels_last)
    e = torch.rand(batch, genes) * 3

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_context(CPU, precision):
            loss = model(x, e)["loss"]
        loss.backward()
        opt.step()

    out = profile_step(step)
    flops = model_flops_per_spot(cfg, training=True, batch_size=batch) * batch
    mm = out["self_seconds"]["matmul"]
    out["matmul_gflops_if_all_flops_in_matmuls"] = round(flops / mm / 1e9, 1) if mm else None
    return out


def profile_embed(preset: str, precision: str, *, batch: int, genes: int) -> dict:
    cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
    model = embed_model(cfg, "autocast")
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with torch.no_grad(), autocast_context(CPU, precision):
            model.embed_images(x)

    return profile_step(run)


def embed_model(cfg: ModelConfig, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if mode == "bf16_weights":
        model = model.to(torch.bfloat16)
    elif mode == "int8_dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model
