"""Multi-process training under ``torchrun``: one process per device, gradients averaged by
DistributedDataParallel.

``torchrun --nproc_per_node 4 -m lrcompress train recipe.toml`` sets ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK``; ``Distributed.setup`` reads them, starts the process group (NCCL on CUDA,
Gloo on CPU) and picks the device. Every rank reads the same full batches and keeps its own
contiguous slice (``shard``), so with equal slices and a mean loss the averaged gradient is
the full-batch gradient. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from .tasks_base import Batch


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False  # this process group was started by us (and is ours to end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str = "auto") -> "Distributed":
        """From the ``torchrun`` environment (single process when ``WORLD_SIZE`` is unset or 1);
        ``device`` is a recipe's (auto, cpu, cuda) and picks the backend."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        started = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cls(rank, world, local).device(device).type == "cuda" else "gloo")
            started = True
        return cls(rank, world, local, started)

    def device(self, kind: str) -> torch.device:
        """The device of this rank for a recipe's ``device`` (auto, cpu, cuda)."""
        if kind not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {kind!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked for, but torch sees no CUDA device")
        if kind == "cpu" or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank % torch.cuda.device_count())

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.world == 1:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def shard(self, batch: Batch) -> Batch:
        """This rank's contiguous slice of a batch (all ranks see the same full batch)."""
        if self.world == 1:
            return batch
        parts = [t.tensor_split(self.world)[self.rank] if t is not None else None
                 for t in (batch.x, batch.y, batch.lengths)]
        return Batch(*parts)

    def sum(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Sum a dict of numbers over the ranks (same keys everywhere)."""
        if self.world == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether any rank raised ``flag`` (so every rank stops at the same update)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.barrier()  # no rank leaves (and drops the store rank 0 hosts) while others still talk
            dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
