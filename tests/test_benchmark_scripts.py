"""The benchmark scripts' --quick modes run end to end (smoke tests; the numbers are not checked for quality)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_her2st_accuracy_quick(shared_data: Path, tmp_path: Path) -> None:
    stem = tmp_path / "acc"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "her2st_accuracy.py"), "--quick", "--her2st",
           str(shared_data / "her2st"), "--work", str(tmp_path / "work"), "--out", str(stem)]
    env = {**os.environ, "CMRCNET_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from accuracy.results import read_record  # the rows live in a compressed sidecar

    record = read_record(Path(f"{stem}.json"))
    assert record["quick"] is True and record["complete"] is True
    methods = {r["method"] for r in record["runs"]}
    assert {"mean", "knn-handcrafted", "knn-ssl+hc", "ridge-ssl+hc", "cmrcnet-ssl+hc", "cmrcnet-ssl+hc+bank",
            "regression-ssl+hc"} <= methods
    knn = next(r for r in record["runs"] if r["method"] == "knn-handcrafted" and r["protocol"] == "patient")
    assert math.isfinite(knn["pcc_heg50"]) and 1 <= knn["k"] <= max(record["k_grid"])
    mean = next(r for r in record["runs"] if r["method"] == "mean")
    assert mean["pcc_heg50"] == 0.0 and mean["mse"] > 0  # a constant prediction scores PCC 0 (headline)
    assert mean["n_constant"] > 0
    summary = record["summary"]["patient"]
    assert summary["cmrcnet-ssl+hc"]["pcc_heg50"]["mean"] is not None
    lo, hi = summary["cmrcnet-ssl+hc"]["vs"]["knn-handcrafted"]["heg50_ci95"]
    assert lo <= hi
    assert "QUICK" in Path(f"{stem}.md").read_text()
    assert record["encoders"]["patient-test-B"]["pretraining"]["transductive"] is False

    # the bank/k benchmark reads the same runs: four ways of predicting, each with its k recorded
    out = tmp_path / "bank_k.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bank_k.py"), "--quick", "--work", str(tmp_path / "work"),
           "--variant", "cmrcnet-ssl+hc", "--seeds", "0", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    bank_k = json.loads(out.read_text())
    assert {(m["bank"], m["k_rule"]) for m in bank_k["means"]} == {
        (b, k) for b in ("training bank", "+ expression-only bank") for k in ("k = 50", "chosen k")}
    assert all(math.isfinite(r["pcc_heg50"]) and r["k"] >= 1 for r in bank_k["rows"])
    assert bank_k["commit"] and bank_k["machine"] and bank_k["extra_bank"] == ["D1"]

    # the reconstruction diagnostic reads them too: the spread and the three expressions' scores per section
    out = tmp_path / "recon.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "recon_diagnostic.py"), "--quick", "--work",
           str(tmp_path / "work"), "--variants", "cmrcnet-ssl+hc", "--seeds", "0", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    recon = json.loads(out.read_text())
    assert [(m["variant"], m["models"]) for m in recon["means"]] == [("cmrcnet-ssl+hc", 1)] * len(recon["tests"])
    assert all(r["embedding_spread"] > 0 and 0 < r["spread_share"] <= 1 for r in recon["rows"])
    assert all(math.isfinite(r[f"relative_{e}"]) for r in recon["rows"] for e in ("own", "shuffled", "section mean"))
    assert recon["commit"] and recon["machine"]["cpu_line"]


@pytest.mark.parametrize("script", ["bank_k.py", "recon_diagnostic.py"])
def test_scripts_on_the_accuracy_runs_without_runs_say_so_and_measure_nothing(tmp_path: Path, script: str) -> None:
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--work", str(tmp_path / "none"), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "nothing measured" in done.stderr and not out.exists()


@pytest.mark.extra
def test_speed_quick(tmp_path: Path) -> None:
    """Without faiss the retrieval section measures exact search only and says so; with it, faiss rows too."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--quick", "--out", str(out),
           "--workdir", str(tmp_path / "work"), "--max-wait", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True
    assert {"peak", "train", "inference", "retrieval", "slide"} <= set(report["sections"])
    assert {n: s["error"] for n, s in report["sections"].items() if "error" in s} == {}
    assert out.with_suffix(".md").is_file()
    retrieval = report["sections"]["retrieval"]
    methods = {r["method"] for r in retrieval["results"]}
    try:
        import faiss  # noqa: F401
    except ImportError:
        assert "faiss is not installed" in retrieval["faiss_skipped"]
        assert methods == {"exact torch chunked (ExactIndex)"}
    else:
        assert "faiss flat (FaissIndex kind=flat)" in methods and "faiss_skipped" not in retrieval
    assert all(r["bank_retriever_predict_ms"] > 0 for r in retrieval["slide_batch_retrieval"])
