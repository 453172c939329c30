"""PyTorch's own distributed stack (torchrun + DistributedDataParallel), used when WORLD_SIZE > 1.

Run e.g. `torchrun --nproc_per_node 4 -m cmrcnet train ...`. Each process trains on its share of every
global batch; the contrastive loss gathers embeddings from all processes so negatives are global.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cmrcnet.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> DistInfo:
    """Read torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) once."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    logger.info("process %d/%d joined the %s group", info.rank, info.world_size, backend)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """ "cpu", "cuda" or "cuda:N"; under torchrun each process takes cuda:LOCAL_RANK."""
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} requested but CUDA is not available on this machine")
        if info.enabled:
            torch.cuda.set_device(info.local_rank)
            return torch.device("cuda", info.local_rank)
        return torch.device(name)
    raise ConfigError(f"unknown device {name!r}; use cpu or cuda")


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `x` (b, D) from all processes (equal b) along dim 0, keeping gradients to every process's
    rows; return it with the offset of this process's rows."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0), dist.get_rank() * x.shape[0]  # (world * b, D)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Send a picklable object from rank 0 to all ranks (trusted: it never leaves this job)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
