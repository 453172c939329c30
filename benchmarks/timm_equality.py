"""Numerical equality of cmrcnet's foundation-model encoders with timm's own implementation (issue 15).

    python benchmarks/timm_equality.py --timm-python /tmp/timmvenv/bin/python [--depth 2]

timm is never a dependency of cmrcnet. This check runs it once, in a throw-away environment made for it:

    python -m venv /tmp/timmvenv
    /tmp/timmvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm numpy safetensors

The script calls that interpreter with `--emit DIR`: for each timm-based entry it builds the model in timm with the
vendor's arguments (depth reduced to `--depth`, every other hyperparameter the vendor's), sets every tensor to
random values (LayerScale gammas around 1, so no block is close to the identity), and saves the state dict, the
input images (0-1 scale) and timm's output. Back in this interpreter, each file is loaded into cmrcnet's module
with `load_encoder_weights(strict=True)` (every tensor consumed), run on the same images (normalised with
ImageNet's constants as the rest of cmrcnet does; the module renormalises to the vendor's) and compared.

Outputs: UNI, UNI2-h, H-optimus, Prov-GigaPath: the class token after the final norm (timm `global_pool="token"`);
Virchow2: class token + mean patch token (the model card's recipe on timm's tokens); CONCH: the trunk's tokens
(timm `forward_features`; the attentional poolers are torch's nn.MultiheadAttention in both). Models timm builds
with `dynamic_img_size=True` are also compared at 112 px (CONCH: 224 px, HEST's size), the position embedding interpolated.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "timm_equality"

# name -> (timm model name, timm keyword arguments as the vendor gives them, output, dynamic image size)
VENDOR_TIMM = {
    "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0), "token", True),
    "uni2-h": (
        "vit_giant_patch14_224",
        dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
             mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer="SwiGLUPacked", act_layer="SiLU",
             reg_tokens=8),
        "token", True,
    ),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, num_classes=0), "token", False),
    "h-optimus-1": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5, num_classes=0), "token", False),
    "virchow2": (
        "vit_huge_patch14_224",
        dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375, global_pool="",
             mlp_layer="SwiGLUPacked", act_layer="SiLU"),
        "token+mean", True,
    ),
    "prov-gigapath": (
        "vit_giant_patch14_dinov2",
        dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
             mlp_ratio=5.33334, num_classes=0),
        "token", False,
    ),
    "conch-v1": (
        "VisionTransformer",
        dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, img_size=448, patch_size=16, num_classes=0),
        "tokens", True,
    ),
}  # fmt: skip
MEANS = {"h-optimus-0": "bioptimus", "h-optimus-1": "bioptimus", "conch-v1": "openai"}
CONSTANTS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "bioptimus": ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),
    "openai": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
SIZES = {"conch-v1": 448}
OTHER_SIZE = {"conch-v1": 224}  # else 112 px: a multiple of 14 and 16


def _normalise(torch, x01, name):
    mean, std = CONSTANTS[MEANS.get(name, "imagenet")]
    return (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def emit(out: Path, depth: int) -> None:
    """In the timm environment: weights, images and timm's outputs for every entry."""
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    layers = {"SwiGLUPacked": SwiGLUPacked, "SiLU": torch.nn.SiLU}
    info = {"timm": timm.__version__, "torch": torch.__version__}
    for name, (arch, kwargs, pool, dynamic) in VENDOR_TIMM.items():
        kw = {k: layers.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
        kw.update(depth=depth, dynamic_img_size=dynamic)
        model = VisionTransformer(**kw) if arch == "VisionTransformer" else timm.create_model(arch, **kw)
        model.eval()
        with torch.no_grad():
            for key, p in model.state_dict().items():
                if key.endswith("gamma") or (("norm" in key) and key.endswith("weight")):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_((0.5 if "embed" in key or "token" in key else 0.05) * torch.randn_like(p))
        side = SIZES.get(name, 224)
        tensors = {}
        for tag, s in [("native", side)] + ([("other", OTHER_SIZE.get(name, 112))] if dynamic else []):
            x01 = torch.rand(2, 3, s, s)
            with torch.no_grad():
                y = model.forward_features(_normalise(torch, x01, name)) if pool == "tokens" else model(
                    _normalise(torch, x01, name)
                )  # fmt: skip
                if pool == "token+mean":  # Virchow2's model card: class token + mean of the patch tokens
                    y = torch.cat([y[:, 0], y[:, model.num_prefix_tokens :].mean(1)], dim=-1)
            tensors[f"x01_{tag}"], tensors[f"timm_{tag}"] = x01, y.contiguous()
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors")
        )
        save_file(tensors, str(out / f"{name}_io.safetensors"))
        info[name] = {"timm_model": arch, "timm_kwargs": {k: str(v) for k, v in kw.items()}}
    (out / "emit.json").write_text(json.dumps(info))


def compare(tmp: Path, depth: int) -> dict:
    """In cmrcnet's environment: load each file into our module and compare outputs."""
    import torch
    from safetensors.torch import load_file

    from cmrcnet.models.encoders import load_encoder_weights
    from cmrcnet.models.foundation import FOUNDATION_SPECS
    from cmrcnet.models.preprocess import IMAGENET_MEAN, IMAGENET_STD

    emitted = json.loads((tmp / "emit.json").read_text())
    rows = {}
    for name, (_, _, pool, _) in VENDOR_TIMM.items():
        spec = FOUNDATION_SPECS[name]
        module = spec.build(depth=depth).trunk if name == "conch-v1" else spec.build(depth=depth)
        report = load_encoder_weights(module, tmp / f"{name}.safetensors", strict=True)
        module.eval()
        io = load_file(str(tmp / f"{name}_io.safetensors"))
        row = {"timm_model": emitted[name]["timm_model"], "timm_kwargs": emitted[name]["timm_kwargs"]}
        row["tensors_loaded"] = report.loaded
        for tag in ("native", "other"):
            if f"x01_{tag}" not in io:
                continue
            x01 = io[f"x01_{tag}"]
            with torch.no_grad():
                if pool == "tokens":  # CONCH's trunk receives the vendor-normalised images from its tower
                    ours = module.forward_tokens(_normalise(torch, x01, name))
                else:
                    m, s = (
                        torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                        torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                    )
                    ours = module((x01 - m) / s).squeeze(1)
            ref = io[f"timm_{tag}"]
            diff = (ours - ref).abs().max().item()
            row[tag] = {
                "input_px": x01.shape[-1],
                "output_shape": list(ref.shape),
                "max_abs_diff": diff,
                "max_abs_output": ref.abs().max().item(),
                "relative": diff / max(ref.abs().max().item(), 1e-12),
            }
        rows[name] = row
    return {"timm": emitted["timm"], "timm_env_torch": emitted["torch"], "models": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-python", default="/tmp/timmvenv/bin/python", help="interpreter with timm")
    parser.add_argument("--depth", type=int, default=2, help="blocks per model (others as the vendor's)")
    parser.add_argument("--emit", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="result path without suffix")
    args = parser.parse_args()
    if args.emit:
        emit(args.emit, args.depth)
        return 0
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent / "src"))
    import torch

    from cmrcnet.atomic import write_json, write_text

    from _machine import git_commit, machine_info

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [args.timm_python, __file__, "--emit", tmp, "--depth", str(args.depth)]
        subprocess.run(cmd, check=True)
        result = compare(Path(tmp), args.depth)
    result.update(
        command=shlex.join(["python", "benchmarks/timm_equality.py", *sys.argv[1:]]),
        commit=git_commit(),
        machine=machine_info(),
        cmrcnet_torch=torch.__version__,
        depth=args.depth,
        seconds=round(time.perf_counter() - t0, 1),
    )
    write_json(args.out.with_suffix(".json"), result)
    lines = [
        "# Foundation encoders against timm's own implementation",
        "",
        f"Written by `{result['command']}` (commit {result['commit']}) in {result['seconds']} s on "
        f"{result['machine']['cpu_line']}. timm {result['timm']} with torch {result['timm_env_torch']} in a "
        f"throw-away venv; cmrcnet with torch {result['cmrcnet_torch']}. Random weights (every tensor), "
        f"depth {args.depth}, every other hyperparameter the vendor's; fp32; 2 images per size. Every tensor "
        "of timm's state dict was loaded (strict).",
        "",
        "| encoder | timm model | input px | output | max abs diff | max abs output | relative |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in result["models"].items():
        for tag in ("native", "other"):
            if tag in row:
                r = row[tag]
                lines.append(
                    f"| {name} | {row['timm_model']} | {r['input_px']} | {r['output_shape']} | "
                    f"{r['max_abs_diff']:.2e} | {r['max_abs_output']:.3g} | {r['relative']:.1e} |"
                )
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
