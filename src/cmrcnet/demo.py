"""`cmrcnet demo`: the whole pipeline on a generated SYNTHETIC dataset (no downloads, no real data).

Steps: write SYNTHETIC slides in the legacy ST layout -> read them with the ST reader -> prepare -> train a
small model on all slides but one -> build the reference bank -> predict the held-out slide -> evaluate it
(strict protocol) with maps of measured vs predicted expression.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cmrcnet.atomic import write_text
from cmrcnet.data.prepare import prepare_sample
from cmrcnet.data.readers import read_sample
from cmrcnet.data.synthetic import SyntheticConfig, sample_patients, write_synthetic_raw

logger = logging.getLogger(__name__)

BANNER = "SYNTHETIC DEMO DATA: procedurally generated images and counts, not biological measurements."


def run_demo(
    out: str | Path,
    *,
    seed: int = 0,
    n_slides: int = 4,
    epochs: int = 8,
    precision: str = "auto",
    progress: bool = True,
) -> list[str]:
    """Run the demo into `out`; return report lines for printing. `precision`: see `resolve_precision`."""
    from cmrcnet.evaluation.evaluate import evaluate_predictions
    from cmrcnet.inference.predict import predict_samples
    from cmrcnet.run.config import load_run_config
    from cmrcnet.workflows.train import train_run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "README_SYNTHETIC.txt", BANNER + "\n")
    cfg = SyntheticConfig(n_slides=max(2, n_slides), n_patients=2 if n_slides >= 4 else 1, seed=seed)
    raw = out / "raw_synthetic"
    write_synthetic_raw(raw, cfg)
    patients = sample_patients(cfg)
    dataset = out / "dataset"
    lines = [BANNER, f"1. wrote {len(patients)} synthetic slides (legacy ST layout) to {raw}"]
    for sid, patient in patients.items():
        # the synthetic grid has a 100 um pitch, not legacy ST's 200 um: give the pixel size as a user would
        sample = read_sample(
            "st", input=raw, sample_id=sid, patient_id=patient, pixel_size_um=cfg.pixel_size_um
        )
        sample.technology = "synthetic"  # ST layout on disk, synthetic content: labels every output SYNTHETIC
        summary = prepare_sample(sample, dataset, progress=progress)
        lines.append(
            f"2. prepared {sid} (patient {patient}): {summary.n_spots} spots, {summary.n_genes} genes"
        )
    ids = list(patients)
    train_ids, test_ids = ids[:-1], ids[-1:]
    run_cfg = load_run_config("cpu")
    run_cfg.train.epochs = epochs
    run_cfg.train.seed = seed
    run_cfg.train.precision = precision
    run_dir = out / "run"
    result = train_run(
        data_dir=dataset,
        train_samples=train_ids,
        run_dir=run_dir,
        config=run_cfg,
        progress=progress,
        resume=(run_dir / "config.yaml").exists(),
        command=f"cmrcnet demo --out {out} --seed {seed}",
    )
    lines.append(
        f"3. trained cmrcnet (cpu preset, {epochs} epochs) on {train_ids}: best validation loss "
        f"{result.best_val_loss:.4f} at epoch {result.best_epoch + 1}; run folder {run_dir}"
    )
    pred_path = out / "prediction.h5ad"
    adata = predict_samples(run_dir, dataset, test_ids, pred_path, precision=precision, progress=progress)
    lines.append(
        f"4. predicted {adata.n_obs} spots x {adata.n_vars} genes of held-out {test_ids} -> {pred_path} "
        f"(mean of the k = {adata.uns['cmrcnet']['k']} most similar bank spots; k chosen on the training slides)"
    )
    report = out / "evaluation"
    metrics = evaluate_predictions(pred_path, dataset, report, plots=True)
    overall = metrics["overall"]
    parts = [
        f"{name} {overall[key]['mean']:.3f}"
        for name, key in (("HEG-50", "pcc_heg50"), ("HVG-50", "pcc_hvg50"), ("markers", "pcc_markers"))
        if overall.get(key, {}).get("mean") is not None
    ]
    lines.append(f"5. mean PCC on the held-out slide: {', '.join(parts)} (SYNTHETIC data)")
    lines.append(f"   report: {report / 'report.html'} (also summary.md, metrics.json, genes.csv, maps_*.png)")
    return lines
