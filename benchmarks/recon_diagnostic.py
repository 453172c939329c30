"""Does CMRCNet's cross-modal reconstruction use the expression, and what does it do to the image embedding?

    python benchmarks/recon_diagnostic.py [--work /tmp/acc] [--fold patient-test-B]
        [--variants cmrcnet-cpu60-ctx224,cmrcnet-cpu60-ctx224-rw3] [--seeds 0,1,2] [--spots 512]

Reads the models the accuracy benchmark trained under WORK (`benchmarks/her2st_accuracy.py --work WORK`; nothing is
trained here). For each model and each of the fold's held-out sections (the first `--spots` spots), it embeds the
patches and measures:
- the image embedding's spread: the per-dimension variance across spots, averaged over dimensions, and its share of
  the embedding's mean square (how much of the embedding tells spots apart; the rest is shared by every spot);
- the reconstruction from the masked image tokens and each spot's own expression, from another spot's expression
  (the rows shuffled), and from the mean expression of the section, each scored as the plain MSE (the paper's
  term) and relative to the spread (`cmrcnet.models.losses.relative_reconstruction_loss`: 0 exact, 1 no better
  than the mean embedding). If own expression is not better than shuffled or mean expression, the branch does
  not use what the spot's expression says.
The masks are drawn 3 times with fixed seeds and averaged. Writes benchmarks/results/recon_diagnostic.json
(command, commit, machine, per-model rows, means per variant) and prints the means. Skips with a message when the
runs are absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cmrcnet.atomic import write_json
from cmrcnet.data.dataset import PreparedDataset
from cmrcnet.data.spots import load_spot_table
from cmrcnet.models.losses import mse_loss_fp32, relative_reconstruction_loss
from cmrcnet.models.preprocess import images_to_float
from cmrcnet.run.load import load_trained_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine_info, provenance
from accuracy import plan, runner

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "recon_diagnostic.json"
MASK_DRAWS = 3
EXPRESSIONS = ("own", "shuffled", "section mean")


@torch.no_grad()
def measure(trained, images: torch.Tensor, expr: torch.Tensor, batch: int = 128) -> dict:
    """Embedding spread and reconstruction scores of one model on one section's spots."""
    model = trained.model.eval()
    tokens, emb = [], []
    for i in range(0, len(images), batch):
        t, e = model.encode_image(images_to_float(images[i : i + batch], layout="nhwc"))
        tokens.append(t.float())
        emb.append(e.float())
    tokens, emb = torch.cat(tokens), torch.cat(emb)
    spread = emb.var(dim=0).mean().item()
    out = {"spots": len(emb), "embedding_spread": spread,
           "spread_share": spread / emb.pow(2).mean().item()}
    g = torch.Generator().manual_seed(0)
    shuffled = expr[torch.randperm(len(expr), generator=g)]
    for name, e in zip(EXPRESSIONS, (expr, shuffled, expr.mean(dim=0, keepdim=True).expand_as(expr)), strict=True):
        mse, rel = [], []
        for draw in range(MASK_DRAWS):
            torch.manual_seed(draw)
            recon = torch.cat([model.reconstruct(tokens[i : i + batch], e[i : i + batch])
                               for i in range(0, len(e), batch)])
            mse.append(mse_loss_fp32(recon, emb).item())
            rel.append(relative_reconstruction_loss(recon, emb).item())
        out[f"mse_{name}"] = float(np.mean(mse))
        out[f"relative_{name}"] = float(np.mean(rel))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/cmrcnet_her2st_accuracy"))
    ap.add_argument("--fold", default="patient-test-B")
    ap.add_argument("--variants", default="cmrcnet-cpu60-ctx224,cmrcnet-cpu60-ctx224-rw3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--spots", type=int, default=512, help="at most this many spots per section")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the accuracy benchmark's --quick runs (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work / ("quick" if args.quick else "full")
    ds = work / "ds"
    fold = next(f for f in plan.folds(["patient"], quick=args.quick) if f["name"] == args.fold)
    variants, seeds = args.variants.split(","), [int(s) for s in args.seeds.split(",")]
    runs = {(v, s): work / "runs" / fold["name"] / f"{v}-seed{s}" for v in variants for s in seeds}
    if runner.runs_absent(runs.values(), ds, args.work):
        return 0
    machine = machine_info()
    t0 = time.perf_counter()
    rows = []
    for (variant, seed), rdir in runs.items():
        trained = load_trained_model(rdir)
        if trained.model.reconstructor is None:
            print(f"{variant}: method {trained.model_config.method!r} has no reconstruction; skipped", file=sys.stderr)
            continue
        vds = PreparedDataset(runner.variant_ds(ds, variant))
        for test in fold["tests"]:
            table = load_spot_table(vds, [test], trained.genes, img_size=trained.model_config.img_size,
                                    target_sum=trained.run_config.genes.target_sum, allow_missing_genes=True,
                                    progress=False)
            n = min(args.spots, len(table.images))
            row = {"variant": variant, "seed": seed, "test": test,
                   **measure(trained, table.images[:n], table.expr[:n])}
            rows.append(row)
            print(f"{variant} seed {seed} {test}: spread {row['embedding_spread']:.4f} "
                  f"(share {row['spread_share']:.3f}); relative own / shuffled / mean "
                  f"{row['relative_own']:.3f} / {row['relative_shuffled']:.3f} / "
                  f"{row['relative_section mean']:.3f}", flush=True)
    keys = ["embedding_spread", "spread_share", *(f"{s}_{e}" for s in ("mse", "relative") for e in EXPRESSIONS)]
    means = []
    for variant in variants:
        for test in fold["tests"]:
            sel = [r for r in rows if (r["variant"], r["test"]) == (variant, test)]
            if sel:
                means.append({"variant": variant, "test": test, "models": len(sel),
                              **{k: float(np.mean([r[k] for r in sel])) for k in keys}})
    result = {
        "benchmark": "does the cross-modal reconstruction use the expression; the image embedding's spread",
        **provenance("recon_diagnostic.py", argv, machine),
        "fold": fold["name"], "train": fold["train"], "tests": fold["tests"], "variants": variants, "seeds": seeds,
        "mask_draws": MASK_DRAWS, "quick": args.quick,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "means": means,
        "rows": rows,
    }
    write_json(args.out, result)
    print("\nmean over seeds: spread (share) | MSE own / shuffled / mean | relative own / shuffled / mean")
    for m in means:
        print(f"  {m['variant']:34s} {m['test']:6s} {m['embedding_spread']:.4f} ({m['spread_share']:.3f}) | "
              + " / ".join(f"{m[f'mse_{e}']:.4f}" for e in EXPRESSIONS) + " | "
              + " / ".join(f"{m[f'relative_{e}']:.3f}" for e in EXPRESSIONS))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
