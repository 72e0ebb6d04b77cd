"""The run directory that the search and training from scratch share.

Both write ``config.json`` (every setting), ``metrics.jsonl`` (one strict-JSON line per
finished epoch) and ``checkpoint.pt`` (after every epoch, and mid-epoch on a signal or the
checkpoint clock), and resume exactly from the last checkpoint. This module holds the file
names, the checks for a new or resumed run, and the writes that must survive a kill or a
full disk: files are written to ``NAME.tmp`` and renamed; a checkpoint is written only when
every value in it is finite, and the one before it is kept as ``checkpoint.prev.pt``, so a
checkpoint that turns out unreadable falls back to the previous one; the checkpoint holds
every rank's RNG state.
"""
from __future__ import annotations

import json
import os
import random
import sys

import numpy as np
import torch

from .config import flag_name
from .distributed import Dist
from .faults import RunStopped, finite_or_none, first_nonfinite

__all__ = ["RunDir", "atomic_save", "atomic_write_text", "rng_state", "set_rng_state",
           "json_line"]


class RunDir:
    """The files of one run in ``out``; ``kind`` ("search", "training run") names it in errors."""

    def __init__(self, out: str, kind: str = "search"):
        self.out = out
        self.kind = kind
        self.config = self.path("config.json")
        self.metrics = self.path("metrics.jsonl")
        self.checkpoint = self.path("checkpoint.pt")
        self.previous = self.path("checkpoint.prev.pt")
        # the search's own files (docs/search.md, "The run directory")
        self.lut = self.path("lut.json")
        self.theta = self.path("theta")
        self.archs = self.path("archs")
        self.summary = self.path("summary.json")
        self.plots = self.path("plots")
        self.baseline = self.path("baseline", "baseline.json")    # fbnet-fast baseline

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def has_checkpoint(self) -> bool:
        return os.path.exists(self.checkpoint) or os.path.exists(self.previous)

    def start(self, cfg, resume):
        """``(config, resume)`` to run with: ``cfg`` for a new run, which must not overwrite
        one; the saved config (a dataclass of ``cfg``'s type) to resume, which needs a
        checkpoint. ``resume="auto"`` resumes when there is a checkpoint, else starts anew."""
        if resume == "auto":
            resume = self.has_checkpoint()
            if not resume:
                return cfg, False
        if not resume:
            if self.has_checkpoint() or os.path.exists(self.metrics):
                raise ValueError(f"{self.out!r} already holds a {self.kind}; pass --resume to "
                                 "continue it or choose another --out")
            return cfg, False
        if not self.has_checkpoint():
            raise FileNotFoundError(f"--resume: {self.checkpoint!r} does not exist; nothing "
                                    "to resume")
        return type(cfg)(**self.saved_config()), True

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

    def load_checkpoint(self, d: Dist, config: dict | None = None) -> dict:
        """The newest usable checkpoint, with this rank's RNG state restored from it.

        Usable: it loads, every value in it is finite, and its config is ``config`` (the
        run directory aside). If checkpoint.pt is not, checkpoint.prev.pt is used, saying so."""
        problems = []
        for path in (self.checkpoint, self.previous):
            ck, why = _load_valid(path, d.device, config)
            if ck is None:
                problems.append(f"{os.path.basename(path)} {why}")
                continue
            if problems and d.main:
                print(f"warning: {problems[0]}; resuming from {os.path.basename(path)} "
                      f"(epoch {ck['epoch']})", file=sys.stderr, flush=True)
            if ck["world"] != d.world:
                raise ValueError(f"the checkpoint was written by {ck['world']} process(es), "
                                 f"this run has {d.world}; resume with the same number for an "
                                 "exact continuation")
            set_rng_state(ck["rng"][d.rank])
            return ck
        raise ValueError(f"--resume: no usable checkpoint in {self.out!r} ({'; '.join(problems)})"
                         "; start a new run in another --out")

    def restart_metrics(self, before: int, d: Dist) -> list:
        """The metrics of epochs < ``before``; rank 0 rewrites metrics.jsonl with just them.

        A run killed after writing an epoch's line but before its checkpoint redoes that
        epoch, so its line goes."""
        rows = []
        if before and os.path.exists(self.metrics):
            with open(self.metrics) as f:
                rows = [r for r in map(json.loads, filter(str.strip, f)) if r["epoch"] < before]
        if d.main:
            atomic_write_text("".join(map(json_line, rows)), self.metrics)
        return rows

    def save(self, d: Dist, state: dict, row: dict | None = None, files: dict | None = None,
             rank_state: dict | None = None) -> None:
        """Write ``files`` (path -> text), append the metrics ``row``, then the checkpoint
        ``state`` with every rank's RNG state and ``rank_state``.

        Called on every rank (the RNG states are gathered); rank 0 writes, and every rank
        raises ``RunStopped`` if it could not: a non-finite value in ``state`` writes nothing;
        a failed write (a full disk) leaves checkpoint.pt and checkpoint.prev.pt as they were."""
        ranks = d.gather_object({"rng": rng_state(), **(rank_state or {})})
        error = None
        if d.main:
            try:
                self._write(state, ranks, row, files or {})
            except RunStopped as e:
                error = str(e)
        error = d.broadcast_object(error)
        if error:
            raise RunStopped(error)

    def _write(self, state, ranks, row, files) -> None:
        bad = first_nonfinite(state)
        if bad:
            raise RunStopped(f"{bad} is not finite; no checkpoint was written and the last good "
                             "one is untouched")
        state = {**state, "rng": [r.pop("rng") for r in ranks], "world": len(ranks)}
        if any(ranks):
            state["ranks"] = ranks
        try:
            for path, text in files.items():
                atomic_write_text(text, path)
            if row is not None:
                old = ""
                if os.path.exists(self.metrics):
                    with open(self.metrics) as f:
                        old = f.read()
                atomic_write_text(old + json_line(row), self.metrics)
            atomic_save(state, self.checkpoint, keep=self.previous)
        except OSError as e:
            raise RunStopped(f"could not write to {self.out!r} ({e.strerror or e}); "
                             f"{os.path.basename(self.checkpoint)} and "
                             f"{os.path.basename(self.previous)} are as they were: free space "
                             "and rerun with --resume") from None


def json_line(row: dict) -> str:
    """One strict-JSON line: a non-finite number is written as null."""
    return json.dumps(finite_or_none(row), allow_nan=False) + "\n"


def _load_valid(path: str, device, config: dict | None):
    """``(checkpoint, None)``, or ``(None, why it cannot be used)``."""
    if not os.path.exists(path):
        return None, "does not exist"
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a torn or corrupt file: any unpickling or zip error
        return None, f"cannot be read ({type(e).__name__})"
    bad = first_nonfinite({k: v for k, v in ck.items() if k != "rng"})
    if bad:
        return None, f"holds a non-finite value ({bad})"
    saved = ck.get("config")
    if config is not None and saved is not None:
        diff = [k for k in saved if k != "out" and k in config and saved[k] != config[k]]
        if diff:
            return None, f"was written with another config ({diff[0]})"
    return ck, None


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


def atomic_save(obj, path: str, keep: str | None = None) -> None:
    """``torch.save`` to ``path.tmp``, fsync, then ``os.replace``: never a torn file. With
    ``keep``, the file ``path`` held before is renamed to ``keep`` first."""
    _atomic(path, "wb", lambda f: torch.save(obj, f), keep)


def atomic_write_text(text: str, path: str) -> None:
    _atomic(path, "w", lambda f: f.write(text))


def _atomic(path: str, mode: str, write, keep: str | None = None) -> None:
    """Write through ``path.tmp``; a failed write (a full disk) removes it and leaves
    ``path`` and ``keep`` as they were."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if keep and os.path.exists(path):
        os.replace(path, keep)
    os.replace(tmp, path)
