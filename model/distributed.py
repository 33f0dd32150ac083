"""Data-parallel training under torchrun: one process per device, DistributedDataParallel, gloo on
CPU and NCCL on CUDA. Outside torchrun (no WORLD_SIZE, or 1) everything here is a no-op, so the
trainer has one code path.

Every rank builds the same global batches and trains on its own rows of each; the loss is summed
over tokens and divided by the global token count, so N ranks take exactly the step one process
would take on the whole global batch. Only rank 0 evaluates and writes files; its decisions
(stop or go on) are broadcast so that every rank leaves the loop at the same step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from seqserve.runtime.errors import SeqserveError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0  # global rank; 0 writes checkpoints, metrics and logs
    size: int = 1  # number of processes (torchrun's WORLD_SIZE)
    local_rank: int = 0  # rank on this node: picks the CUDA device

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group when launched by it; returns the world and this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    world = World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise SeqserveError(f"LOCAL_RANK {world.local_rank}: this node has {torch.cuda.device_count()} CUDA "
                                "devices; start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world, device


def close_world(world: World) -> None:
    """Leave the process group (a no-op outside torchrun)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (returned as is outside torchrun)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def from_main(obj: Any, world: World) -> Any:
    """Rank 0's `obj` on every rank (pickled; for small decisions and the tokenizer)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
