"""`cmrcnet demo` end to end (small: 2 synthetic slides, 1 epoch)."""

import json
from pathlib import Path

from cmrcnet.cli import main


def test_demo_runs_the_whole_pipeline(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--slides", "2", "--epochs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and "summary.md" in printed
    assert "SYNTHETIC" in (out / "README_SYNTHETIC.txt").read_text()
    for name in ("run/best.pt", "run/bank.pt", "prediction.h5ad", "evaluation/metrics.json", "evaluation/summary.md"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["synthetic"] is True and metrics["protocol_id"] == "strict"
    assert metrics["test_samples"] == ["synS2"]
    assert list(out.glob("evaluation/maps_synS2_*.png"))
    chosen = json.loads((out / "run" / "retrieval_k.json").read_text())
    assert chosen["how"].startswith("two spatial halves")  # one training slide
    assert f"k = {chosen['k']} most similar bank spots; k chosen on the training slides" in printed
