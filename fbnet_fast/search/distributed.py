"""Process groups, cross-rank reductions, device picking and seeding.

Search and training run as one process or under ``torchrun`` (one process per GPU, or
several CPU processes with gloo). ``Dist`` is this process's place in the job (rank,
world, reductions); what survives a restart (RNG state, checkpoints) is in rundir.py.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Dist", "setup", "pick_device", "seed_all"]


@dataclass
class Dist:
    """This process's place in the job (world 1 = no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def average_grad(self, p: torch.Tensor) -> None:
        """Average ``p.grad`` over ranks (θ lives outside DDP)."""
        if self.active and p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return dev


def setup(device: str = "auto") -> Dist:
    """Join the ``torchrun`` process group if WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
