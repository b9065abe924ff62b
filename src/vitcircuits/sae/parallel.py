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

import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitcircuits.sae.model import SAE


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


def train_data_parallel(processes: int, rows: Callable[[], Iterable[torch.Tensor]], train: Callable[..., tuple[SAE, list[dict]]],
                        device_type: str = "cpu") -> tuple[SAE, list[dict]]:
    """Run ``train(rows(), progress=..., device=...)`` (a :func:`~vitcircuits.sae.train.train_sae`
    with its configs bound) in ``processes`` spawned processes, gloo on the CPU or nccl with one GPU
    per process on ``cuda``; return rank 0's SAE and history. ``rows`` and ``train`` must be
    picklable (module-level functions or partials of them)."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_train_rank, args=(processes, folder, rows, train, device_type), nprocs=processes, join=True)
        result = torch.load(Path(folder) / "rank0.pt", weights_only=True)
    sae = SAE(train.keywords["sae_config"])
    sae.load_state_dict(result["state"])
    return sae.eval(), result["history"]


def _train_rank(rank: int, world: int, folder: str, rows, train, device_type: str) -> None:
    cuda = device_type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        sae, history = train(rows(), progress=rank == 0, device=f"cuda:{rank}" if cuda else "cpu")
        if rank == 0:
            torch.save({"state": sae.state_dict(), "history": history}, Path(folder) / "rank0.pt")
    finally:
        dist.destroy_process_group()
