"""torchrun integration: process-group set-up, DDP or FSDP wrapping, and small collectives.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the process group uses
NCCL on CUDA and gloo on CPU. DDP replicates the model; FSDP shards it with torch's
``fully_shard`` (FSDP2), one unit per transformer layer plus the root. Only rank 0 logs and
writes files. Without torchrun everything here is a no-op on one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    """Initialise the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def wrap(module: nn.Module, d: Dist, strategy: str) -> nn.Module:
    """DDP or FSDP around ``module`` when running on several processes."""
    if not d.enabled:
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(module.model, "layers", []):
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def all_sum(value: float | int, d: Dist) -> float:
    """Sum a number over all processes."""
    if not d.enabled:
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return float(t)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
