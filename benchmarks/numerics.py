"""Accuracy before and after the reference numerics (issue 12): initialisation and the fp32 residual stream.

    python benchmarks/numerics.py [--her2st ../shared/data/her2st] [--seeds 0,1,2] [--epochs 10]

Patient-level fold: train on patient C (C2-C6), test section B4 (patient B), strict genes (250 HVG of the
training sections + the breast markers of her2st_accuracy.py), cpu preset, the default precision (auto),
`--epochs` epochs. Two variants of the same code, differing only in:

  before  what cmrcnet did up to commit ef342be: truncated normal (std 0.02, cut at 2 std) for every Linear and
          the patch convolution of the ViT, class token and position embedding; the cross-attention's query
          and key/value projections drawn xavier-uniform separately; the ViT's residual stream cast to the
          autocast dtype (bf16 under bf16 autocast).
  after   the reference's rules (models/vit.py, models/layers.py): Linear N(0, 0.01), patch convolution
          kaiming-normal (fan_out), tokens N(0, 0.02), q/k/v as one xavier matrix, residual stream fp32.

The "before" variant is reproduced here by swapping those three functions in for the run (same seeds, data and
everything else). Scores are per-gene PCC on B4 (strict protocol: HEG-50/HVG-50 chosen on the training
sections), mean over seeds. Writes benchmarks/results/numerics.json and .md with command, commit and machine.
Skips with a message when the her2st data are absent.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cmrcnet.atomic import write_json, write_text
from cmrcnet.evaluation.evaluate import evaluate_predictions
from cmrcnet.inference.predict import predict_samples
from cmrcnet.models.layers import CrossAttention
from cmrcnet.models.vit import VisionTransformer
from cmrcnet.run.config import load_run_config
from cmrcnet.workflows.train import train_run

from _machine import git_commit, machine_info
from her2st_accuracy import MARKERS, prepare

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "numerics.json"
TRAIN, TEST = ["C2", "C3", "C4", "C5", "C6"], ["B4"]


def _old_trunc_normal(t: torch.Tensor, std: float = 0.02) -> None:
    nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


def _old_vit_reset(self: VisionTransformer) -> None:
    _old_trunc_normal(self.pos_embed)
    _old_trunc_normal(self.cls_token)
    for module in self.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            _old_trunc_normal(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _old_vit_forward(self: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    x = self.patch_embed(images)
    cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = self.pos_drop(x + self.pos_embed.to(x.dtype))
    for block in self.blocks:
        x = block(x)
    return self.norm(x)


def _old_cross_reset(self: CrossAttention) -> None:
    for layer in (self.q, self.kv):
        nn.init.xavier_uniform_(layer.weight)
    self.proj.reset_parameters()
    for layer in (self.q, self.kv, self.proj):
        nn.init.zeros_(layer.bias)


@contextlib.contextmanager
def numerics(variant: str) -> Iterator[None]:
    if variant == "after":
        yield
        return
    saved = (VisionTransformer.reset_parameters, VisionTransformer.forward, CrossAttention.reset_parameters)
    VisionTransformer.reset_parameters = _old_vit_reset
    VisionTransformer.forward = _old_vit_forward
    CrossAttention.reset_parameters = _old_cross_reset
    try:
        yield
    finally:
        VisionTransformer.reset_parameters, VisionTransformer.forward, CrossAttention.reset_parameters = saved


def run_one(ds: Path, work: Path, variant: str, seed: int, epochs: int) -> dict:
    cfg = copy.deepcopy(load_run_config("cpu"))
    cfg.train.epochs, cfg.train.seed = epochs, seed
    cfg.genes.include = list(MARKERS)
    run = work / f"{variant}_seed{seed}"
    t0 = time.perf_counter()
    with numerics(variant):
        result = train_run(data_dir=ds, train_samples=TRAIN, run_dir=run, config=cfg, progress=False,
                           resume=(run / "config.yaml").exists())  # fmt: skip
        pred = predict_samples(run, ds, TEST, run / "pred.h5ad", progress=False)
    seconds = time.perf_counter() - t0
    m = evaluate_predictions(run / "pred.h5ad", ds, run / "eval", markers=list(MARKERS), plots=False)
    o = m["overall"]
    row = {
        "variant": variant,
        "seed": seed,
        "pcc_heg50": o["pcc_heg50"]["mean"],
        "pcc_hvg50": o["pcc_hvg50"]["mean"],
        "pcc_markers": o["pcc_markers"]["mean"],
        "best_val_loss": result.best_val_loss,
        "precision": pred.uns["cmrcnet"]["precision"],
        "seconds": round(seconds, 1),
    }
    print(f"  {row}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--her2st", type=Path, default=HERE.parents[1] / "shared" / "data" / "her2st")
    ap.add_argument("--work", type=Path, default=HERE / "work" / "numerics")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (args.her2st / "counts").is_dir():
        print(f"skipped: her2st data not found at {args.her2st}")
        return 0
    t0 = time.perf_counter()
    ds = args.work / "ds"
    prepare(args.her2st, ds, TRAIN + TEST)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for variant in ("before", "after"):
            rows.append(run_one(ds, args.work, variant, seed, args.epochs))
    summary = {}
    for variant in ("before", "after"):
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant] = {
            key: {"mean": round(statistics.mean(r[key] for r in mine), 4),
                  "sd": round(statistics.stdev(r[key] for r in mine), 4) if len(mine) > 1 else None}
            for key in ("pcc_heg50", "pcc_hvg50", "pcc_markers")
        }  # fmt: skip
    paired = [a["pcc_heg50"] - b["pcc_heg50"] for a, b in zip(
        [r for r in rows if r["variant"] == "after"], [r for r in rows if r["variant"] == "before"], strict=True)]  # fmt: skip
    record = {
        "benchmark": "reference numerics, before vs after",
        "command": shlex.join(["python", "benchmarks/numerics.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine_info(),
        "protocol": f"train {TRAIN}, test {TEST} (patient-level), strict genes + markers, cpu preset, "
                    f"{args.epochs} epochs, precision auto",
        "runs": rows,
        "summary": summary,
        "heg50_after_minus_before_per_seed": [round(d, 4) for d in paired],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    md = [
        "# Reference numerics: accuracy before and after (her2st, train C2-C6, test B4)",
        "",
        f"`{record['command']}` at {record['commit']}; {record['machine']['cpu_line']}; auto -> "
        f"{record['machine']['precision_auto']}; {record['wall_seconds']} s. {record['protocol']}. "
        "Mean ± sd over seeds of the per-gene PCC on B4.",
        "",
        "| variant | seeds | HEG-50 PCC | HVG-50 PCC | markers PCC |",
        "|---|---|---|---|---|",
    ]
    for variant, s in summary.items():
        n = sum(r["variant"] == variant for r in rows)
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" if s[k]["sd"] is not None else f"{s[k]['mean']:.3f}"
                 for k in ("pcc_heg50", "pcc_hvg50", "pcc_markers")]  # fmt: skip
        md.append(f"| {variant} | {n} | " + " | ".join(cells) + " |")
    md += ["", f"HEG-50 after - before, per seed: {record['heg50_after_minus_before_per_seed']}.", ""]
    write_text(args.out.with_suffix(".md"), "\n".join(md))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
