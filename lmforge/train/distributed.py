"""torchrun integration: process-group set-up, DDP or FSDP wrapping, and small collectives.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) the process group uses
NCCL on CUDA and gloo on CPU. DDP replicates the model; FSDP shards it with torch's
``fully_shard`` (FSDP2), one unit per transformer layer plus the root. Only rank 0 logs and
writes files. Without torchrun everything here is a no-op on one process.

Every command that trains runs inside ``session()``: on success all processes meet at a barrier
before the group is destroyed, so no process tears its connections down while another is still
writing the run directory, and meet again on the rendezvous store after destroying it, so none exits
while a peer is still shutting its gloo threads down (gloo aborts a process whose peer disappears
mid-exchange: "terminate called without an active exception").
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import UserError


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

        from lmforge.models.registry import transformer_blocks

        for block in transformer_blocks(
            module, self_contained=True
        ):  # one FSDP unit per block, found by type, then the rest
            fully_shard(block)
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


def teardown(d: Dist, *, wait: bool = True) -> None:
    """Destroy the process group; with ``wait`` every process meets the others at a barrier first, and after
    destroying waits on the rendezvous store until all have destroyed theirs, so no process exits (closing its
    sockets) while a peer's gloo threads are still being torn down."""
    if not (d.enabled and dist.is_initialized()):
        return
    if not wait:
        dist.destroy_process_group()
        return
    dist.barrier()
    # the rendezvous store outlives the group (torchrun's agent hosts it; else the first process, which waits)
    store = dist.distributed_c10d._get_default_store()
    dist.destroy_process_group()
    key = "lmforge/destroyed"
    store.add(key, 1)
    deadline = time.monotonic() + 300
    while int(store.add(key, 0)) < d.world_size and time.monotonic() < deadline:  # a peer that died: torchrun
        time.sleep(0.01)  # ends the job anyway; do not hang past that


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[Dist]:
    """``setup()`` for the length of a command; the group is torn down in one place when it ends.

    On success every process waits for the others first. On an error the group is destroyed without
    waiting (the peers may never arrive; torchrun stops them when this process exits non-zero).
    """
    d = setup(device)
    try:
        yield d
    except BaseException:
        teardown(d, wait=False)
        raise
    teardown(d)


def full_state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer, d: Dist, strategy: str) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts of a (task-wrapped) model, gathered on CPU under FSDP.

    ``module`` holds the model as ``module.model``; the returned model keys are the model's own.
    """
    if d.enabled and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(module, optimizer, options=opts)
        return {k.removeprefix("model."): v for k, v in model_sd.items()}, optim_sd
    return module.model.state_dict(), optimizer.state_dict()


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict, d: Dist, strategy: str):
    """Load a full optimizer state dict, re-sharding it under FSDP."""
    if d.enabled and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
    elif any(isinstance(k, str) for k in state.get("state", {})):
        raise UserError(
            "this checkpoint's optimizer state was written under FSDP: resume it with torchrun and "
            "--train.distributed fsdp"
        )
    else:
        optimizer.load_state_dict(state)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP has sharded ``model``'s parameters (DTensors): then only all processes together can run it."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(module: nn.Module, d: Dist, strategy: str) -> dict:
    """The whole (unsharded) state dict of ``module.model`` on every process; every process must call it."""
    if d.enabled and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        return {k.removeprefix("model."): v for k, v in state.items()}
    return module.model.state_dict()
