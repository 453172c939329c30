"""Device and precision helpers shared by training and inference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from cmrcnet.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The compute context of every model call: mixed precision (bf16 on CPU or CUDA, fp16 on CUDA only, nothing
    for fp32) and, when training on the CPU (gradients enabled), the plain ("math") attention kernel.

    For our short sequences (50 tokens) the math kernel's backward was faster than torch's fused CPU attention in
    standalone paired checks during development on a 2-core EPYC (bf16 training x1.05-1.09 paper preset, x1.24 cpu
    preset); the committed full run (benchmarks/results/speed.md) shows x1.00, so the gain is small at best. For
    inference the two are within a few percent and torch's default is kept.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 mixed precision needs CUDA; use --precision bf16 or fp32 on the CPU")
    return _compute_context(device, precision)


@contextlib.contextmanager
def _compute_context(device: torch.device, precision: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if device.type == "cpu" and torch.is_grad_enabled():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if precision != "fp32":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
        yield
