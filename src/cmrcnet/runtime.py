"""Device and precision helpers shared by training and inference."""

from __future__ import annotations

import contextlib

import torch

from cmrcnet.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context: bf16 on CPU or CUDA, fp16 on CUDA only, or nothing for fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 mixed precision needs CUDA; use --precision bf16 or fp32 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
