"""Helpers shared by the inference tests (a plain module, imported by name like training_utils)."""

from __future__ import annotations

from pathlib import Path

from cmrcnet.data.prepare import prepare_sample
from cmrcnet.data.synthetic import SyntheticConfig, make_synthetic_samples
from cmrcnet.run.config import load_run_config
from cmrcnet.workflows.train import train_run


def bank_run(root: Path) -> tuple[Path, Path]:
    """(dataset, run): three synthetic slides plus an expression-only copy of synS3 ("exprOnly", like her2st C1),
    and a tiny run (1 epoch) trained on synS1 and synS2 with its bank. Each caller gets its own (it may change
    the bank)."""
    ds = root / "ds"
    synthetic = SyntheticConfig(n_slides=3, n_patients=1, n_rows=6, n_cols=6, n_genes=30)
    for s in make_synthetic_samples(synthetic):
        prepare_sample(s, ds, patch_px=32, progress=False)
    expr_only = make_synthetic_samples(synthetic)[2]
    expr_only.sample_id, expr_only.image = "exprOnly", None
    expr_only.counts.obs["sample_id"] = "exprOnly"
    prepare_sample(expr_only, ds, progress=False)
    cfg = load_run_config("tiny")
    cfg.train.epochs = 1
    run = root / "run"
    train_run(data_dir=ds, train_samples=["synS1", "synS2"], run_dir=run, config=cfg, progress=False)
    return ds, run
