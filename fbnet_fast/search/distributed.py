"""Process groups, cross-rank reductions, device picking and seeding.

Search and training run as one process or under ``torchrun`` (one process per GPU, or
several CPU processes with gloo). ``Dist`` is this process's place in the job (rank,
world, reductions); what survives a restart (RNG state, checkpoints) is in rundir.py.

When one rank fails, the others must not wait forever in a collective: the failing rank
records its message in the job's store before it exits, its exit breaks the peers'
collectives within seconds, and each peer then raises that message (``Dist.failure``).
"""
from __future__ import annotations

import datetime
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .faults import RunStopped

__all__ = ["Dist", "setup", "job", "pick_device", "seed_all", "PeerFailed"]

FAILURE_KEY = "fbnet_fast/failure"


class PeerFailed(RunStopped):
    """Another rank failed first; the message is its own."""


@dataclass
class Dist:
    """This process's place in the job (world 1 = no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    store: object = None          # the job's key-value store (torchrun's or rank 0's)

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

    def total(self, n: int) -> int:
        """``n`` summed over ranks."""
        return int(self.all_reduce_sum(torch.tensor([n], dtype=torch.float64,
                                                    device=self.device)).item())

    def average_grad(self, p: torch.Tensor) -> None:
        """Average ``p.grad`` over ranks (θ lives outside DDP)."""
        if self.active and p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world)

    def agree(self, flags: list) -> list:
        """Each flag, true when it is true on any rank (one all-reduce of a few bytes)."""
        if not self.active:
            return [bool(f) for f in flags]
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [bool(v) for v in t.tolist()]

    def failure(self, error: BaseException) -> BaseException:
        """What this rank raises after ``error``: its own error if it failed first (its
        message is recorded for the others), else ``PeerFailed`` with the first message."""
        if not self.active or self.store is None or isinstance(error, RunStopped):
            return error                # RunStopped: every rank stops with the same message
        lines = str(error).strip().splitlines()
        mine = f"rank {self.rank}: {type(error).__name__}: {lines[0] if lines else ''}"
        try:
            first = self.store.compare_set(FAILURE_KEY, "", mine).decode()
        except Exception:   # the store went with a failed rank 0: keep this rank's own error
            return error
        return error if first == mine else PeerFailed(f"stopped because {first}")

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
    store = None
    if world > 1 and not dist.is_initialized():
        # The store is kept for Dist.failure (init_process_group would hide it).
        store, _, _ = next(dist.rendezvous("env://", rank, world,
                                           timeout=datetime.timedelta(minutes=30)))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                store=dist.PrefixStore("default_pg", store),
                                rank=rank, world_size=world)
    return Dist(rank, world, local, dev, store)


@contextmanager
def job(device: str = "auto"):
    """``setup`` for the length of a run; an error on any rank ends the run on every rank
    with the first failing rank's message (``Dist.failure``)."""
    d = setup(device)
    try:
        yield d
    except Exception as e:
        error = d.failure(e)
        if error is e:
            raise
        raise error from None
    finally:
        d.close()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
