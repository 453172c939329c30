"""Section train: a full training step per preset and precision, with interleaved variants."""

from __future__ import annotations

import time
from typing import Any

import torch

from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.flops import model_flops_per_spot
from cmrcnet.runtime import autocast_context

from .common import (
    CPU,
    counted_flops,
    median,
    metered,
    num_threads,
    run_worker,
    sdpa_context,
    src_sdpa_choice,
    timed,
)
from .profiling import profile_train


# ---------------------------------------------------------------------------------------------- train
def measure_train(
    preset: str, precision: str, *, configs: dict[str, dict], batch: int, rounds: int, warmup: int, genes: int
) -> dict[str, dict]:
    """Time a cmrcnet training step (forward, backward, AdamW) under each config, interleaved.

    ONE model and optimiser; every round runs one step per config in turn, so slow drifts of the machine (a
    shared VM) hit all configs alike. The first `warmup` rounds are not timed. Config keys: threads (int),
    channels_last (bool, default True), sdpa ("src"/"fused"/"math", see sdpa_context), pipeline (index a uint8 patch table, random
    flips and rot90, normalise, as the trainer does, and update the EMA after the step), compile
    (torch.compile of the model). "baseline" must be one of the configs; each other config gets the median
    over rounds of (baseline step time / its step time) of the same round.
    """
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    s = cfg.img_size
    gen = torch.Generator().manual_seed(0)
    expr = torch.rand(batch, genes, generator=gen) * 3
    images = torch.randn(batch, 3, s, s, generator=gen)
    inputs = {True: images.contiguous(memory_format=torch.channels_last), False: images.contiguous()}
    pipeline = any(c.get("pipeline") for c in configs.values())
    if pipeline:
        from cmrcnet.training.spots import augment
        from cmrcnet.training.trainer import EMA

        table = torch.randint(0, 256, (2 * batch, s, s, 3), dtype=torch.uint8, generator=gen)
        ema = EMA(model, 0.99)
    compiled = torch.compile(model) if any(c.get("compile") for c in configs.values()) else None

    def step(c: dict) -> float:
        fmt = torch.channels_last if c.get("channels_last", True) else torch.contiguous_format
        with num_threads(c.get("threads")):
            t0 = time.perf_counter()
            x = inputs[c.get("channels_last", True)]
            if c.get("pipeline"):
                idx = torch.randperm(len(table), generator=gen)[:batch]
                x = augment(table[idx], gen, flips=True, rot90=True).contiguous(memory_format=fmt)
            opt.zero_grad(set_to_none=True)
            with autocast_context(CPU, precision), sdpa_context(c.get("sdpa", "src")):
                loss = (compiled if c.get("compile") else model)(x, expr)["loss"]
            loss.backward()
            opt.step()
            if c.get("pipeline"):
                ema.update(model)
                float(loss.detach())
            return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(warmup + rounds):
        for name, c in configs.items():
            times[name].append(step(c))
    base = times["baseline"][warmup:]
    out = {}
    for name, ts in times.items():
        t = median(ts[warmup:])
        res = {
            "step_seconds_median": round(t, 4),
            "step_seconds_all": [round(x, 3) for x in ts],
            "spots_per_s": round(batch / t, 2),
        }
        if name != "baseline":
            res["speedup_vs_baseline"] = round(
                median([b / x for b, x in zip(base, ts[warmup:], strict=True)]), 3
            )
        if configs[name].get("compile"):  # the warm-up rounds hold the compilation (forward and backward)
            res["compile_seconds"] = round(sum(ts[:warmup]) - warmup * t, 1)
        out[name] = res
    return out


def pipeline_overheads(preset: str, *, batch: int, genes: int, reps: int = 5) -> dict:
    """Time of the trainer's per-step work outside the model: batch augmentation and the EMA update."""
    from cmrcnet.training.spots import augment
    from cmrcnet.training.trainer import EMA

    cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(
        0, 256, (2 * batch, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8, generator=gen
    )
    model = build_model(cfg)
    ema = EMA(model, 0.99)

    def aug() -> None:
        idx = torch.randperm(len(table), generator=gen)[:batch]
        augment(table[idx], gen, flips=True, rot90=True).contiguous(memory_format=torch.channels_last)

    aug()
    ema.update(model)
    return {
        "augment_ms": round(1e3 * median([timed(aug) for _ in range(reps)]), 1),
        "ema_update_ms": round(1e3 * median([timed(lambda: ema.update(model)) for _ in range(reps)]), 1),
        "n_parameters": sum(p.numel() for p in model.parameters()),
    }


TRAIN_BF16_CONFIGS = {
    "baseline": {},
    "threads=1": {"threads": 1},
    "contiguous input": {"channels_last": False},
    "fused SDPA kernel": {"sdpa": "fused"},
    "math SDPA kernel": {"sdpa": "math"},
    "trainer pipeline (augment+EMA)": {"pipeline": True},
}
TRAIN_FP32_CONFIGS = {
    "baseline": {},
    "fused SDPA kernel": {"sdpa": "fused"},
    "math SDPA kernel": {"sdpa": "math"},
}


def sec_train(p: dict, peak: dict, out: dict) -> None:
    batch, genes = p["train_batch"], p["genes"]
    common = dict(batch=batch, rounds=p["train_steps"], genes=genes)
    out["setup"] = (
        f"cmrcnet method, batch {batch}, {genes} genes, random inputs. Per preset and precision ONE model is "
        f"trained with the configs interleaved step by step ({p['train_warmup']} untimed + {p['train_steps']} "
        "timed rounds; spots/s from the median step; speed-up = median over rounds of the baseline's step time / "
        "the config's, so drifts of this shared VM cancel). Baseline = autocast to the precision, channels-last "
        f"input, {torch.get_num_threads()} threads, the attention kernel src's autocast_context picks (the "
        "trainer minus its input pipeline). torch.compile runs in a fresh process with an empty inductor cache, interleaved with eager "
        "steps of the same model there"
    )
    out["matmul_peak_gflops"] = {k: round(v, 1) for k, v in peak.items()}
    out["src_attention_kernel"] = src_sdpa_choice()
    rows, presets = [], {}
    for preset in p["train_presets"]:
        cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
        flops = model_flops_per_spot(cfg, training=True, batch_size=batch)
        info: dict[str, Any] = {"train_gflop_per_spot": round(flops / 1e9, 3)}
        info["ceiling_spots_per_s"] = {k: round(v * 1e9 / flops, 1) for k, v in peak.items()}
        # cross-check of the analytic count (FlopCounterMode sees matmuls and the patch convolution only)
        small = 8
        model = build_model(cfg).train()
        x = torch.randn(small, 3, cfg.img_size, cfg.img_size)
        e = torch.rand(small, genes)
        counted = counted_flops(lambda m=model, x=x, e=e: m(x, e)["loss"].backward()) / small
        info["flop_check_batch8"] = {
            "analytic_gflop_per_spot": round(
                model_flops_per_spot(cfg, training=True, batch_size=small) / 1e9, 3
            ),
            "flopcounter_gflop_per_spot_no_attention": round(counted / 1e9, 3),
        }
        del model
        info["pipeline_overheads"] = pipeline_overheads(preset, batch=batch, genes=genes)
        info["profile_bf16_step"] = metered(profile_train, preset, "bf16", batch=batch, genes=genes)
        presets[preset] = info

        def add(variant: str, precision: str, res: dict, preset=preset, flops=flops) -> dict:
            row = {"preset": preset, "precision": precision, "variant": variant, "batch_size": batch, **res}
            if "spots_per_s" in res:
                gf = res["spots_per_s"] * flops / 1e9
                row["achieved_gflops"] = round(gf, 1)
                row["fraction_of_peak"] = round(gf / peak[precision], 3)
            rows.append(row)
            sp, up = res.get("spots_per_s"), res.get("speedup_vs_baseline")
            msg = f"{sp:7.1f} spots/s" if sp is not None else f"ERROR {res.get('error')}"
            print(
                f"  train {preset:5s} {precision} {variant:36s} {msg}" + (f"  x{up}" if up else ""),
                flush=True,
            )
            return row

        def add_group(precision: str, group: dict) -> None:
            shared = {k: group.pop(k) for k in ("others_cpu_cores", "others_cpu_cores_before") if k in group}
            if "error" in group:
                add("(group failed)", precision, {"error": group["error"], **shared})
                return
            for name, res in group.items():
                add(name, precision, {**res, **shared})

        warm = p["train_warmup"]
        add_group(
            "fp32", metered(measure_train, preset, "fp32", configs=TRAIN_FP32_CONFIGS, warmup=warm, **common)
        )
        add_group(
            "bf16", metered(measure_train, preset, "bf16", configs=TRAIN_BF16_CONFIGS, warmup=warm, **common)
        )
        if p["compile"]:
            spec = {"kind": "train", "preset": preset, "precision": "bf16", **common}
            spec["warmup"] = p["compile_warmup"]
            res = metered(run_worker, spec, p["compile_timeout_s"])
            if "error" in res:
                add("torch.compile", "bf16", res)
            else:
                eager = res["baseline"]
                res = {**res["torch.compile"], "others_cpu_cores": res["others_cpu_cores"]}
                res["note"] = f"own process; eager baseline there {eager['spots_per_s']} spots/s"
                add("torch.compile", "bf16", res)
        else:
            rows.append(
                {"preset": preset, "precision": "bf16", "variant": "torch.compile", "batch_size": batch}
                | {"skipped": "--quick"}
            )
        mine = [r for r in rows if r["preset"] == preset and r["precision"] == "bf16"]
        base = next(r for r in mine if r["variant"] == "baseline")
        best = max(
            (r for r in mine if "speedup_vs_baseline" in r and "pipeline" not in r["variant"]),
            key=lambda r: r["speedup_vs_baseline"],
            default=None,
        )
        if best is None or best["speedup_vs_baseline"] <= 1.0:
            best = {"variant": "baseline (no variant was faster)", "speedup_vs_baseline": 1.0}
        info["before_after_bf16"] = {
            "before": {"variant": "baseline", "spots_per_s": base["spots_per_s"]},
            "after": {
                "variant": best["variant"],
                "spots_per_s": round(base["spots_per_s"] * best["speedup_vs_baseline"], 2),
            },
            "speedup": best["speedup_vs_baseline"],
            "how": "after = baseline spots/s x the best paired speed-up",
        }
    out["presets"] = presets
    out["results"] = rows
