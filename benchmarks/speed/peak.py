"""Section peak: matmul peaks (fp32, bf16), the ViT's own GEMM shapes and an int8 Linear."""

from __future__ import annotations

import warnings

import torch

from .common import INT8_PEAK, timed
from _machine import matmul_peak_gflops


# ---------------------------------------------------------------------------------------------- peak
def sec_peak(p: dict, out: dict) -> dict:
    peak = {
        "fp32": matmul_peak_gflops(torch.float32, sizes=p["peak_sizes"], repeats=p["peak_repeats"]),
        "bf16": matmul_peak_gflops(torch.bfloat16, sizes=p["peak_sizes"], repeats=p["peak_repeats"]),
    }
    out["matmul_peak_gflops"] = {k: round(v, 1) for k, v in peak.items()}
    out["matmul_peak_method"] = (
        f"best of {p['peak_repeats']} square matmuls of sides {list(p['peak_sizes'])} (_machine.matmul_peak_gflops)"
    )
    print(f"matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s", flush=True)
    # the paper ViT's GEMMs at batch 64 (64 x 50 tokens): qkv, MLP up, MLP down
    shapes = [(3200, 768, 2304), (3200, 768, 3072), (3200, 3072, 768)] if not p["quick"] else [(256, 64, 256)]
    gemm = []
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for m, k, n in shapes:
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            a @ b
            best = min(timed(lambda a=a, b=b: a @ b) for _ in range(p["peak_repeats"]))
            gemm.append(
                {"precision": name, "m_k_n": [m, k, n], "gflops": round(2 * m * k * n / best / 1e9, 1)}
            )
    out["model_gemm_gflops"] = gemm
    # int8: a dynamically quantised Linear (activations quantised per call), as quantize_dynamic makes it
    side = max(p["peak_sizes"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(torch.nn.Linear(side, side)), {torch.nn.Linear}, dtype=torch.qint8
        )
    x = torch.randn(side, side)
    with torch.no_grad():
        q(x)
        best = min(timed(lambda: q(x)) for _ in range(p["peak_repeats"]))
    out["int8_dynamic_linear_gops"] = round(2 * side**3 / best / 1e9, 1)
    print(f"int8 dynamic-quantised Linear: {out['int8_dynamic_linear_gops']:.0f} GOP/s", flush=True)
    INT8_PEAK["gops"] = out["int8_dynamic_linear_gops"]
    return peak
