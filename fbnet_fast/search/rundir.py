"""The run directory that the search and training from scratch share.

Both write ``config.json`` (every setting), ``metrics.jsonl`` (one line per finished
epoch) and ``checkpoint.pt`` (after every epoch), and resume exactly from the last
checkpoint. This module holds the file names, the checks for a new or resumed run, and
the writes that must survive a kill: files are written to ``NAME.tmp`` and renamed, and
the checkpoint holds every rank's RNG state.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch

from .config import flag_name
from .distributed import Dist

__all__ = ["RunDir", "atomic_save", "atomic_write_text", "rng_state", "set_rng_state"]


class RunDir:
    """The files of one run in ``out``; ``kind`` ("search", "training run") names it in errors."""

    def __init__(self, out: str, kind: str = "search"):
        self.out = out
        self.kind = kind
        self.config = self.path("config.json")
        self.metrics = self.path("metrics.jsonl")
        self.checkpoint = self.path("checkpoint.pt")
        # the search's own files (docs/search.md, "The run directory")
        self.lut = self.path("lut.json")
        self.theta = self.path("theta")
        self.archs = self.path("archs")
        self.summary = self.path("summary.json")
        self.plots = self.path("plots")

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def start(self, cfg, resume: bool):
        """The config to run with: ``cfg`` for a new run, which must not overwrite one; the
        saved config (a dataclass of ``cfg``'s type) to resume, which needs a checkpoint."""
        if not resume:
            if os.path.exists(self.checkpoint) or os.path.exists(self.metrics):
                raise ValueError(f"{self.out!r} already holds a {self.kind}; pass --resume to "
                                 "continue it or choose another --out")
            return cfg
        if not os.path.exists(self.checkpoint):
            raise FileNotFoundError(f"--resume: {self.checkpoint!r} does not exist; nothing "
                                    "to resume")
        return type(cfg)(**self.saved_config())

    def saved_config(self, explicit: dict | None = None, free: tuple = ()) -> dict:
        """The settings in config.json, ``out`` set to this directory.

        A resumed run continues with its saved settings, so an ``explicit`` one (None
        means not given) that differs from them is an error, except the names in ``free``.
        """
        if not os.path.exists(self.config):
            raise FileNotFoundError(f"--resume: {self.config!r} does not exist; nothing to "
                                    "resume")
        with open(self.config) as f:
            saved = json.load(f)
        for k, v in (explicit or {}).items():
            if v is not None and k != "out" and k not in free and saved.get(k) != v:
                raise ValueError(f"--resume continues the saved config: --{flag_name(k)} {v!r} "
                                 f"differs from the run's {saved.get(k)!r}; drop the flag")
        return {**saved, "out": self.out}

    def write_config(self, config: dict) -> None:
        os.makedirs(self.out, exist_ok=True)
        atomic_write_text(json.dumps(config, indent=2) + "\n", self.config)

    def load_checkpoint(self, d: Dist) -> dict:
        """The last checkpoint, with this rank's RNG state restored from it."""
        ck = torch.load(self.checkpoint, map_location=d.device, weights_only=False)
        if ck["world"] != d.world:
            raise ValueError(f"the checkpoint was written by {ck['world']} process(es), this "
                             f"run has {d.world}; resume with the same number for an exact "
                             "continuation")
        set_rng_state(ck["rng"][d.rank])
        return ck

    def restart_metrics(self, before: int, d: Dist) -> list:
        """The metrics of epochs < ``before``; rank 0 rewrites metrics.jsonl with just them.

        A run killed after writing an epoch's line but before its checkpoint redoes that
        epoch, so its line goes."""
        rows = []
        if before and os.path.exists(self.metrics):
            with open(self.metrics) as f:
                rows = [r for r in map(json.loads, filter(str.strip, f)) if r["epoch"] < before]
        if d.main:
            atomic_write_text("".join(json.dumps(r) + "\n" for r in rows), self.metrics)
        return rows

    def end_epoch(self, d: Dist, row: dict, state: dict) -> None:
        """Append the epoch's metrics line, then save ``state`` with every rank's RNG state.

        Called on every rank (the RNG states are gathered); rank 0 writes, and all ranks
        return once the checkpoint is in place."""
        rngs = d.gather_object(rng_state())
        if d.main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            atomic_save({**state, "rng": rngs, "world": d.world}, self.checkpoint)
        d.barrier()


def rng_state() -> dict:
    """Every RNG stream this process draws from (torch CPU and CUDA, numpy, python)."""
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
         "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path.tmp``, fsync, then ``os.replace``: never a torn file."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
