"""Section inference: `CMRCNet.embed_images` patches/s per preset, batch and precision, with variants."""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from cmrcnet.models import build_model
from cmrcnet.models.config import ModelConfig
from cmrcnet.models.flops import model_flops_per_spot
from cmrcnet.runtime import autocast_context

from .common import (
    CPU,
    INT8_PEAK,
    counted_flops,
    embed_flops_per_patch,
    median,
    metered,
    num_threads,
    run_worker,
    sdpa_context,
    src_sdpa_choice,
)
from .profiling import embed_model, profile_embed


# ---------------------------------------------------------------------------------------------- inference
def _agreement(y: torch.Tensor, ref: torch.Tensor) -> dict:
    """How close embeddings are to the fp32 ones: cosine per patch, and the error relative to the spread."""
    y, ref = y.float(), ref.float()
    cos = F.cosine_similarity(y, ref, dim=1)
    spread = (ref - ref.mean(0, keepdim=True)).norm()
    return {
        "cosine_to_fp32_min": round(float(cos.min()), 5),
        "error_over_spread": round(float((y - ref).norm() / spread), 4),
    }


def measure_embed(
    preset: str, *, configs: dict[str, dict], batch: int, rounds: int, warmup: int, genes: int
) -> dict:
    """Patches/s of `embed_images` in eval mode under each config, interleaved batch by batch (as in
    `measure_train`). Config keys: precision ("fp32"/"bf16"), ref (the config its speed-up is relative to),
    threads, channels_last, sdpa, grad ("no_grad"/"inference_mode"), compile, and mode: "autocast" (as
    `embed_patches`: fp32 weights, autocast to the precision), "bf16_weights" (weights and input in bf16, no
    autocast), "int8_dynamic" (Linear layers int8 with activations quantised per call, fp32 elsewhere) or
    "embed_patches" (`cmrcnet.inference.predict.embed_patches` from uint8 patches, augment/normalise included).
    The last timed output of each config is compared with the fp32 embeddings of the same patches.
    """
    cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
    models: dict[str, torch.nn.Module] = {}
    for c in configs.values():
        mode = c.get("mode", "autocast")
        key = "autocast" if mode == "embed_patches" else mode
        if key not in models:
            models[key] = embed_model(cfg, key)
    fp32_model = models.get("autocast") or embed_model(cfg, "autocast")
    gen = torch.Generator().manual_seed(1)
    uint8 = torch.randint(0, 256, (batch, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8, generator=gen)
    from cmrcnet.training.spots import augment

    x = augment(uint8, torch.Generator(), flips=False, rot90=False)  # the normalised float input
    with torch.no_grad():
        reference = fp32_model.embed_images(x.contiguous())
    inputs = {
        (True, False): x.contiguous(memory_format=torch.channels_last),
        (False, False): x.contiguous(),
        (True, True): x.contiguous(memory_format=torch.channels_last).to(torch.bfloat16),
        (False, True): x.contiguous().to(torch.bfloat16),
    }
    compiled = {}
    for name, c in configs.items():
        if c.get("compile"):
            compiled[name] = torch.compile(models[c.get("mode", "autocast")].embed_images)

    def run(name: str, c: dict) -> tuple[float, torch.Tensor]:
        mode = c.get("mode", "autocast")
        grad_ctx = torch.inference_mode if c.get("grad") == "inference_mode" else torch.no_grad
        with num_threads(c.get("threads")), grad_ctx():
            t0 = time.perf_counter()
            if mode == "embed_patches":
                from cmrcnet.inference.predict import embed_patches

                trained = SimpleNamespace(model=models["autocast"], model_config=cfg)
                y = embed_patches(trained, uint8, batch_size=batch, precision=c["precision"])
            else:
                xin = inputs[(c.get("channels_last", True), mode == "bf16_weights")]
                fn = compiled.get(name) or models[mode].embed_images
                prec = c["precision"] if mode == "autocast" else "fp32"
                with autocast_context(CPU, prec), sdpa_context(c.get("sdpa", "src")):
                    y = fn(xin)
                y = y.float()
            return time.perf_counter() - t0, y

    times: dict[str, list[float]] = {name: [] for name in configs}
    last: dict[str, torch.Tensor] = {}
    for _ in range(warmup + rounds):
        for name, c in configs.items():
            t, last[name] = run(name, c)
            times[name].append(t)
    out = {}
    for name, ts in times.items():
        t = median(ts[warmup:])
        res = {"seconds_per_batch": round(t, 4), "patches_per_s": round(batch / t, 2)}
        ref = configs[name].get("ref")
        if ref:
            pairs = zip(times[ref][warmup:], ts[warmup:], strict=True)
            res["speedup_vs_baseline"] = round(median([b / x for b, x in pairs]), 3)
            res["relative_to"] = ref
        if configs[name].get("compile"):
            res["compile_seconds"] = round(sum(ts[:warmup]) - warmup * t, 1)
        res.update(_agreement(last[name], reference))
        out[name] = res
    return out


EMBED_CONFIGS = {
    "baseline fp32": {"precision": "fp32"},
    "baseline bf16": {"precision": "bf16"},
    "threads=1": {"precision": "bf16", "threads": 1, "ref": "baseline bf16"},
    "contiguous input": {"precision": "bf16", "channels_last": False, "ref": "baseline bf16"},
    "fused SDPA kernel": {"precision": "bf16", "sdpa": "fused", "ref": "baseline bf16"},
    "math SDPA kernel": {"precision": "bf16", "sdpa": "math", "ref": "baseline bf16"},
    "inference_mode": {"precision": "bf16", "grad": "inference_mode", "ref": "baseline bf16"},
    "bf16 weights (no autocast)": {"precision": "bf16", "mode": "bf16_weights", "ref": "baseline bf16"},
    "int8 dynamic quant (Linear)": {"precision": "fp32", "mode": "int8_dynamic", "ref": "baseline bf16"},
    "embed_patches from uint8": {"precision": "bf16", "mode": "embed_patches", "ref": "baseline bf16"},
    "fused SDPA kernel (fp32)": {"precision": "fp32", "sdpa": "fused", "ref": "baseline fp32"},
    "math SDPA kernel (fp32)": {"precision": "fp32", "sdpa": "math", "ref": "baseline fp32"},
}


def sec_inference(p: dict, peak: dict, out: dict) -> None:
    genes, rounds = p["genes"], p["infer_steps"]
    out["setup"] = (
        "CMRCNet.embed_images in eval mode under torch.no_grad on normalised random uint8 patches, the configs "
        f"interleaved batch by batch on the same models (1 untimed + {rounds} timed rounds; patches/s from the "
        "median batch; speed-up = median over rounds of the reference config's batch time / this config's). "
        "Baseline = src's autocast_context for the precision, channels-last input, torch's default thread count "
        "(what embed_patches does). Agreement: cosine to the fp32 embeddings of the same patches and "
        "||y - y_fp32|| / ||y_fp32 - mean|| (randomly initialised weights, so only a rough guide for trained ones)"
    )
    out["matmul_peak_gflops"] = {k: round(v, 1) for k, v in peak.items()}
    out["src_attention_kernel"] = src_sdpa_choice()
    rows, presets = [], {}
    for preset in p["infer_presets"]:
        cfg = ModelConfig.from_preset(preset, n_genes=genes, method="cmrcnet")
        flops = embed_flops_per_patch(cfg)
        model = build_model(cfg).eval()
        x2 = torch.randn(2, 3, cfg.img_size, cfg.img_size)
        with torch.no_grad():
            counted = counted_flops(lambda m=model, x=x2: m.embed_images(x)) / 2
        del model
        presets[preset] = {
            "embed_gflop_per_patch": round(flops / 1e9, 4),
            "flopcounter_gflop_per_patch_no_attention": round(counted / 1e9, 4),
            "model_flops_per_spot_training_false_gflop": round(
                model_flops_per_spot(cfg, training=False, batch_size=64) / 1e9, 4
            ),
            "ceiling_patches_per_s": {k: round(v * 1e9 / flops, 1) for k, v in peak.items()},
            "profile_bf16_batch": metered(
                profile_embed, preset, "bf16", batch=p["infer_batches"][0], genes=genes
            ),
        }

        def add(variant: str, precision: str, batch: int, res: dict, preset=preset, flops=flops) -> dict:
            row = {"preset": preset, "precision": precision, "variant": variant, "batch_size": batch, **res}
            if "patches_per_s" in res:
                gf = res["patches_per_s"] * flops / 1e9
                row["achieved_gflops"] = round(gf, 1)
                row["fraction_of_peak"] = round(gf / peak[precision], 3)
            if variant.startswith("int8") and INT8_PEAK.get("gops") and "achieved_gflops" in row:
                row["fraction_of_peak"] = round(row["achieved_gflops"] / INT8_PEAK["gops"], 3)
                row["note"] = f"fraction of the int8 Linear rate {INT8_PEAK['gops']} GOP/s"
            rows.append(row)
            pp, up = res.get("patches_per_s"), res.get("speedup_vs_baseline")
            msg = f"{pp:8.1f} patches/s" if pp is not None else f"ERROR {res.get('error')}"
            print(f"  embed {preset:5s} {precision} b{batch:<4d} {variant:30s} {msg}" + (f"  x{up}" if up else ""), flush=True)  # fmt: skip
            return row

        def add_group(batch: int, configs: dict, group: dict) -> None:
            shared = {k: group.pop(k) for k in ("others_cpu_cores", "others_cpu_cores_before") if k in group}
            if "error" in group:
                add("(group failed)", "bf16", batch, {"error": group["error"], **shared})
                return
            for name, res in group.items():
                prec = configs[name]["precision"] if name in configs else "bf16"
                variant = "baseline" if name.startswith("baseline") else name
                add(
                    variant.replace(" (fp32)", ""),
                    "bf16" if name.startswith("int8") else prec,
                    batch,
                    {**res, **shared},
                )

        b = p["infer_batches"][0]  # the slide default (64)
        kw = dict(rounds=rounds, warmup=1, genes=genes)
        add_group(b, EMBED_CONFIGS, metered(measure_embed, preset, configs=EMBED_CONFIGS, batch=b, **kw))
        two = {k: EMBED_CONFIGS[k] for k in ("baseline fp32", "baseline bf16")}
        for batch in p["infer_batches"][1:]:
            add_group(batch, two, metered(measure_embed, preset, configs=two, batch=batch, **kw))
        if p["compile"]:
            spec = {"kind": "embed", "preset": preset, "batch": b, "rounds": rounds, "genes": genes}
            spec["warmup"] = p["compile_warmup"]
            res = metered(run_worker, spec, p["compile_timeout_s"])
            if "error" in res:
                add("torch.compile", "bf16", b, res)
            else:
                eager = res["baseline bf16"]
                res = {**res["torch.compile"], "others_cpu_cores": res["others_cpu_cores"]}
                res["note"] = f"own process; eager baseline there {eager['patches_per_s']} patches/s"
                add("torch.compile", "bf16", b, res)
        else:
            rows.append(
                {"preset": preset, "precision": "bf16", "variant": "torch.compile", "batch_size": b}
                | {"skipped": "--quick"}
            )
        mine = [
            r for r in rows if r["preset"] == preset and r["batch_size"] == b and r["precision"] == "bf16"
        ]
        base = next(r for r in mine if r["variant"] == "baseline")
        cands = [
            r for r in mine if r.get("relative_to") == "baseline bf16" or r["variant"] == "torch.compile"
        ]
        cands = [
            r for r in cands if "speedup_vs_baseline" in r and not r["variant"].startswith("embed_patches")
        ]
        none = {"variant": "baseline (no variant was faster)", "speedup_vs_baseline": 1.0}
        best = max(
            [r for r in cands if not r["variant"].startswith("int8")] + [none],
            key=lambda r: r["speedup_vs_baseline"],
        )
        best_any = max([*cands, none], key=lambda r: r["speedup_vs_baseline"])
        presets[preset]["before_after_bf16"] = {
            "before": {"variant": "baseline", "patches_per_s": base["patches_per_s"]},
            "after_same_numerics": {
                "variant": best["variant"],
                "patches_per_s": round(base["patches_per_s"] * best["speedup_vs_baseline"], 2),
            },
            "after_any": {
                "variant": best_any["variant"],
                "patches_per_s": round(base["patches_per_s"] * best_any["speedup_vs_baseline"], 2),
            },
            "how": "after = baseline patches/s x the best paired speed-up",
        }  # fmt: skip
    out["presets"] = presets
    out["results"] = rows
