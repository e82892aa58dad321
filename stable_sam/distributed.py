"""Data parallelism for RTS over the plugin's parameters only (``torchrun``, DDP semantics).

SAM is frozen and identical everywhere, so only the plugin's ~0.08 M gradients cross processes:
each rank encodes and prompts its own images, the gradients are averaged (all-reduce) before the
optimiser step, and every rank applies the same update, so the weights stay equal without a
``DistributedDataParallel`` wrapper (the plugin runs inside SAM's decoder through a hook, not as
a module the wrapper could call). With no process group it is a no-op of world size 1.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallelGroup:
    """This process's ``rank`` in a group of ``world`` training processes."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "DataParallelGroup":
        """The group of this process: torch.distributed's rank and world size when it is
        initialised, else one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def broadcast(self, params: Sequence[torch.Tensor]) -> None:
        """Rank 0's values to every rank (a fresh plugin is seeded alike, a given one may not be)."""
        if self.world > 1:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)

    def average_gradients(self, params: Sequence[torch.Tensor], contributed: bool) -> bool:
        """Mean of the gradients over the ranks that had data this step (a rank whose share of
        the last step is empty sends zeros and is not counted). Returns whether any rank had."""
        if self.world == 1:
            return contributed
        flat = torch.cat([p.grad.reshape(-1) for p in params] +
                         [torch.ones(1, device=params[0].device) * float(contributed)])
        dist.all_reduce(flat)
        count = float(flat[-1])
        if count == 0:
            return False
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p) / count)
            offset += n
        return True

    def total(self, value: int) -> int:
        """Sum of an integer over the ranks (summary counts)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return int(t.item())

    def merge_counts(self, counts: Counter) -> Counter:
        """Sum of a Counter over the ranks (keys may differ between ranks)."""
        if self.world == 1:
            return counts
        every = [None] * self.world
        dist.all_gather_object(every, dict(counts))
        return sum((Counter(c) for c in every), Counter())

    def from_rank0(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object (e.g. the version string, which holds the time)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_from_env(device: str = "auto") -> DataParallelGroup:
    """Join the process group ``torchrun`` describes (WORLD_SIZE, RANK, MASTER_ADDR, ...): NCCL on
    GPUs (one per LOCAL_RANK), gloo on CPU. One process without torchrun: world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return DataParallelGroup.current()
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return DataParallelGroup.current()
