"""Speed of training, patch encoding, retrieval and whole-slide prediction, each against the machine's limit.

    python benchmarks/speed.py [--quick] [--sections peak,train,inference,retrieval,slide] [--out PATH]

Sections (each records machine, commit, command, wall time and the load average before and after):

- peak: the measured fp32 and bf16 matmul peak (square matmuls, `_machine.matmul_peak_gflops`), the rate of the
  paper ViT's own GEMM shapes, and the rate of an int8 dynamically quantised Linear layer.
- train: a full cmrcnet training step (forward, backward, AdamW) per preset at batch 64 on random inputs, fp32
  and bf16: spots/s, analytic FLOPs per spot (`model_flops_per_spot`), achieved GFLOP/s and fraction of the
  precision's matmul peak, plus variants that look for the gaps (the trainer's input pipeline and EMA, 1 vs 2
  threads, contiguous vs channels-last input, the fused vs the math attention kernel, torch.compile in a fresh
  process with a cold inductor cache), interleaved step by step with the baseline on one model so that drifts
  of this shared VM cancel, each with its paired speed-up over the baseline.
- inference: `CMRCNet.embed_images` (eval, no grad) patches/s per preset, batch and precision, with encoder
  FLOPs per patch, plus interleaved variants (threads, memory format, attention kernel, bf16 weights instead of autocast, int8
  dynamic quantisation of the Linear layers, torch.compile, and `embed_patches` from uint8 as `predict` runs it).
- retrieval: top-50 cosine search of 1000 queries in banks of 1e4, 1e5 and 1e6 spots of dimension 256 drawn from
  a Gaussian mixture (clustered like real embeddings, not uniform): exact chunked torch search (`ExactIndex`)
  against `FaissIndex` (flat, IVF, HNSW) with nprobe / efSearch tuned on separate queries so that recall@50
  against exact search is >= 0.95, plus IVF trained on a sample (a knob `FaissIndex` lacks), and the cost of
  one slide batch's retrieval: the bank prepared once (`BankRetriever`, what predict-slide does) against
  preparing it for every batch (`predict_from_embeddings`). Without faiss (`pip install "cmrcnet[faiss]"`) only
  the exact rows are measured and the section says so.
- slide: `cmrcnet predict-slide` in a child process on synthetic pyramidal TIFFs of two sizes (4x the area) with
  1-epoch paper- and cpu-preset runs trained on synthetic data: tiles/s and the child's peak RSS.

`--quick` runs every section at toy sizes (tiny preset, small banks and slides, no torch.compile) in about a
minute and writes results/speed_quick.json, so the committed full results are not overwritten. Results of the
sections run are merged into an existing results file (other sections are kept), and the .md next to it is
rewritten from the merged JSON. A benchmark, not a test: numbers depend on the machine and its load.

The package holds one module per section (peak, train, inference, retrieval, slide), `profiling`, `targets`, the
report writer `report` (speed.md) and `main`; `python benchmarks/speed.py` and `python -m benchmarks.speed` (from
the repository root) both run `main`.
"""

import sys
from pathlib import Path

_BENCHMARKS = Path(__file__).resolve().parents[1]
for _path in (_BENCHMARKS, _BENCHMARKS.parent / "src"):  # `_machine`, and the working tree installed or not
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from .common import embed_flops_per_patch  # noqa: E402  (benchmarks/precision.py imports it)

__all__ = ["embed_flops_per_patch"]
