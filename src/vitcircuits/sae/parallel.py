"""Data-parallel SAE training over ``torch.distributed`` (``torchrun``, or any launcher that
initialises a process group; gloo on CPUs, nccl on GPUs).

Every rank reads the same seeded stream of global batches and trains on an equal slice of each
(:meth:`DataParallel.local`); gradients are averaged over ranks before the optimiser step, so each
step is that of one process on the whole global batch (the losses are means over rows). Which
latents fired is combined over ranks, so dead-latent tracking and AuxK stay in step; the BatchTopK
threshold is averaged. Ranks start from the same seeded weights and the same normalisation sample,
so they stay identical; only rank 0 writes checkpoints. Exact for TopK and ReLU SAEs up to float
rounding (tested against one process with gloo on 2 CPU processes); BatchTopK selects its top
``k * B`` within each rank's slice, as data-parallel BatchTopK implementations do.

Compute is split; reading is not: every rank streams the whole harvest through its own shuffle
buffer (bounded memory), which keeps the batches identical to a single process's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the process group."""

    rank: int
    world: int

    @classmethod
    def from_process_group(cls) -> DataParallel | None:
        """The initialised default process group's rank and size, or None (single process)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local(self, x_BD: torch.Tensor) -> torch.Tensor:
        """This rank's equal slice of a global batch."""
        if x_BD.shape[0] % self.world:
            raise ValueError(f"batch of {x_BD.shape[0]} rows does not split into {self.world} equal parts; "
                             f"use a batch size divisible by the number of processes")
        n = x_BD.shape[0] // self.world
        return x_BD[self.rank * n : (self.rank + 1) * n]

    def average_gradients(self, module: torch.nn.Module) -> None:
        for parameter in module.parameters():
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad.div_(self.world)

    def any(self, mask_F: torch.Tensor) -> torch.Tensor:
        """Where any rank's mask is set."""
        flags = mask_F.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.bool()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a tensor (a copy)."""
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world
