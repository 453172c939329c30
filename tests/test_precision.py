"""`--precision auto`: the choice per device, the GEMM probe and its cache, warnings, and where it is recorded."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from cmrcnet import runtime
from cmrcnet.cli import main
from cmrcnet.errors import ConfigError
from cmrcnet.runtime import check_precision, cpu_gemm_probe, probe_cache_path, resolve_precision

SLOW_BF16 = {torch.float32: 161.0, torch.bfloat16: 1.0}  # an AVX2-only CPU (issue 12's measurement)
FAST_BF16 = {torch.float32: 200.0, torch.bfloat16: 900.0}  # a CPU with AVX512-BF16 / AMX


@pytest.fixture
def fake_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Replace the GEMM timing with fixed speeds; a fresh cache file and in-process memo per test."""
    monkeypatch.setenv("CMRCNET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "_PROBES", {})
    monkeypatch.setattr(runtime, "_LOGGED", set())
    calls: list[torch.dtype] = []

    def use(speeds: dict) -> list[torch.dtype]:
        def measure(dtype: torch.dtype, **_: object) -> float:
            calls.append(dtype)
            return speeds[dtype]

        monkeypatch.setattr(runtime, "_measure_gemm", measure)
        return calls

    return use


def test_auto_on_a_cpu_without_fast_bf16_is_fp32_and_says_why(fake_cpu, caplog) -> None:
    fake_cpu(SLOW_BF16)
    with caplog.at_level(logging.INFO, logger="cmrcnet.runtime"):
        choice = resolve_precision("auto", "cpu", training=True)
        resolve_precision("auto", "cpu", training=True)
    assert (choice.requested, choice.precision) == ("auto", "fp32")
    assert "bf16 GEMM 1.0 vs fp32 161.0 GFLOP/s" in choice.reason
    logged = [r.getMessage() for r in caplog.records if "precision auto" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("precision auto -> fp32: bf16 GEMM 1.0 vs fp32 161.0")


def test_auto_on_a_cpu_with_fast_bf16_is_bf16(fake_cpu) -> None:
    fake_cpu(FAST_BF16)
    choice = resolve_precision("auto", torch.device("cpu"))
    assert choice.precision == "bf16" and choice.probe["bf16_speedup"] == pytest.approx(4.5)


def test_a_small_bf16_advantage_is_not_enough(fake_cpu) -> None:
    fake_cpu({torch.float32: 200.0, torch.bfloat16: 250.0})  # x1.25 in a GEMM is lost to casts end to end
    assert resolve_precision("auto", "cpu").precision == "fp32"


def test_explicit_bf16_on_a_slow_cpu_runs_but_warns_with_the_ratio(fake_cpu, caplog) -> None:
    fake_cpu(SLOW_BF16)
    with caplog.at_level(logging.WARNING, logger="cmrcnet.runtime"):
        choice = resolve_precision("bf16", "cpu")
    assert choice.precision == "bf16"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "no fast bf16" in warning and "x0.006" in warning and "auto would run fp32" in warning


def test_explicit_fp32_needs_no_probe_and_fp16_needs_cuda(fake_cpu) -> None:
    calls = fake_cpu(SLOW_BF16)
    assert resolve_precision("fp32", "cpu").precision == "fp32"
    assert calls == []
    with pytest.raises(ConfigError, match="fp16 mixed precision needs CUDA"):
        resolve_precision("fp16", "cpu")


def test_the_probe_is_cached_per_machine_on_disk(fake_cpu, monkeypatch) -> None:
    calls = fake_cpu(SLOW_BF16)
    first = cpu_gemm_probe()
    assert not first["cached"] and calls == [torch.float32, torch.bfloat16]
    stored = json.loads(probe_cache_path().read_text())
    assert stored["format"] == runtime.PROBE_FORMAT and len(stored["machines"]) == 1
    monkeypatch.setattr(runtime, "_PROBES", {})  # a new process: only the file remains
    again = cpu_gemm_probe()
    assert again["cached"] and again["bf16_gflops"] == first["bf16_gflops"] and len(calls) == 2
    monkeypatch.setattr(runtime, "_PROBES", {})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # another thread count is another machine key
    assert not cpu_gemm_probe()["cached"] and len(calls) == 4


def test_a_damaged_probe_cache_is_measured_again_and_rewritten(fake_cpu) -> None:
    calls = fake_cpu(FAST_BF16)
    path = probe_cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert cpu_gemm_probe()["bf16_gflops"] == 900.0 and len(calls) == 2
    assert json.loads(path.read_text())["format"] == runtime.PROBE_FORMAT


def test_cuda_auto_is_bf16_where_supported_else_fp16(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "_LOGGED", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Old GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: False)
    choice = resolve_precision("auto", "cuda", training=True)
    assert choice.precision == "fp16" and "gradient scaler" in choice.reason
    with pytest.raises(ConfigError, match="Old GPU does not support bf16"):
        resolve_precision("bf16", "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: True)
    assert resolve_precision("auto", "cuda").precision == "bf16"


def test_unknown_precision_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16; got 'fp8'"):
        check_precision("fp8")


@pytest.mark.parametrize("command", ["train", "predict", "predict-slide", "pretrain", "cv", "demo"])
def test_cli_unknown_precision_exits_2_with_one_line(command: str, capsys) -> None:
    required = {
        "train": ["--data", "d", "--train-samples", "a", "--out", "o"],
        "predict": ["--model", "m", "--data", "d", "--samples", "a", "--out", "o.h5ad"],
        "predict-slide": ["--model", "m", "--slide", "s.jpg", "--out", "o"],
        "pretrain": ["--slides", "s.jpg", "--out", "o"],
        "cv": ["--data", "d", "--split", "kfold", "--out", "o"],
        "demo": ["--out", "o"],
    }[command]
    with pytest.raises(SystemExit) as exc:
        main([command, *required, "--precision", "fp8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"cmrcnet {command}: error: argument --precision: invalid choice: 'fp8'")
    assert "'auto', 'fp32', 'bf16', 'fp16'" in err[0]
