"""What long runs meet, and how a run stops on it: non-finite values, SIGTERM/SIGINT, the
periodic checkpoint clock, and the one-line errors with their exit codes.

A ``StepGuard`` is asked twice per step, on every rank: before the step (a bad batch, a
stop signal, a checkpoint due) and after the backward pass (non-finite values). Its answers
are agreed across ranks with one small all-reduce, so every rank stops, skips or writes a
checkpoint at the same step and none is left waiting in a collective the others have left.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time

import torch

__all__ = ["EXIT_STOPPED", "EXIT_PREEMPTED", "RunStopped", "Preempted", "StepGuard",
           "first_nonfinite", "finite_or_none"]

EXIT_STOPPED = 3      # a fault stopped the run (non-finite values, a failed write, a failed rank)
EXIT_PREEMPTED = 75   # SIGTERM / SIGINT: a checkpoint was written; rerun with --resume


class RunStopped(Exception):
    """A run stopped on a fault; the message is one line saying what to do."""

    code = EXIT_STOPPED
    label = "error"

    def report(self, command: str) -> int:
        """Print the one line the command ends with; return its exit code."""
        print(f"fbnet-fast {command}: {self.label}: {self}", file=sys.stderr, flush=True)
        return self.code


class Preempted(RunStopped):
    """SIGTERM or SIGINT: the step finished, a resumable checkpoint was written."""

    code = EXIT_PREEMPTED
    label = "stopped"


def first_nonfinite(obj, path: str = "") -> str | None:
    """The key path of the first non-finite float in a nested state (dicts, lists, tensors)."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return path or "value"
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else path or "value"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = first_nonfinite(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def finite_or_none(obj):
    """``obj`` with every non-finite float replaced by None: strict JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


class StepGuard:
    """The per-step checks of a run, used as a context manager around its epochs.

    ``nonfinite``: ``stop`` ends the run on a non-finite loss or gradient; ``skip`` drops
    the step (weights, optimiser and BN statistics as before it, like AMP's grad scaler)
    and stops after ``max_skips`` skipped steps in a row. SIGTERM and SIGINT only set a flag
    (a second one acts as before); ``every_minutes`` > 0 asks for a checkpoint that often.
    """

    def __init__(self, d, nonfinite: str = "stop", max_skips: int = 10,
                 every_minutes: float = 30.0, clock=time.monotonic):
        self.d = d
        self.policy = nonfinite
        self.max_skips = max_skips
        self.every = every_minutes * 60.0
        self.clock = clock
        self.last_checkpoint = clock()
        self.signal: int | None = None
        self.in_row = 0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signum, self._old[signum])   # a second signal acts as it did before

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a signal"

    def before_step(self, fault: str | None) -> str | None:
        """``"stop"`` (a signal on some rank), ``"checkpoint"`` (the clock) or None.

        ``fault``: this rank could not draw its batch (a bad image); the run stops on every
        rank with that message (exit 2, like any bad input)."""
        due = self.d.main and self.every > 0 and self.clock() - self.last_checkpoint >= self.every
        bad, stop, due = self.d.agree([fault is not None, self.signal is not None, due])
        if bad:
            if not self.d.active:
                raise ValueError(fault)
            msgs = self.d.gather_object(fault)
            r = next(r for r, m in enumerate(msgs) if m is not None)
            raise ValueError(f"rank {r}: {msgs[r]}")
        return "stop" if stop else "checkpoint" if due else None

    def checkpointed(self) -> None:
        self.last_checkpoint = self.clock()

    def steps(self, batches, first: int, n: int, save, what: str):
        """Yield ``(i, x, y)`` for steps ``first`` .. ``n - 1`` from the iterator ``batches``,
        asking ``before_step`` first. ``save(i)`` writes a checkpoint that resumes at step
        ``i``; after a signal the run then stops with ``Preempted`` (``what``: "weight steps
        of epoch 3")."""
        for i in range(first, n):
            fault = x = y = None
            try:
                x, y = next(batches)
            except ValueError as e:          # a bad image (data.BadImageError)
                fault = str(e)
            todo = self.before_step(fault)
            if todo:
                save(i)
                self.checkpointed()
                if todo == "stop":
                    raise Preempted(f"{self.signal_name}: a checkpoint after {i} of {n} {what} "
                                    "is written; rerun the same command with --resume (or "
                                    "--resume auto) to continue")
            yield i, x, y

    def snapshot(self, module) -> list | None:
        """The buffers (BN statistics) a skipped step must put back; None under ``stop``."""
        if self.policy != "skip":
            return None
        return [b.detach().clone() for b in module.buffers()]

    def step_ok(self, finite: torch.Tensor, module, saved: list | None, where: str,
                hint: str) -> bool:
        """True: take the optimiser step. False: the step is dropped (``skip``).

        ``finite``: this rank's loss (and gradients) are finite, a bool tensor. Raises
        ``RunStopped`` naming ``where`` and the likely cause ``hint`` under ``stop``, or
        after ``max_skips`` dropped steps in a row."""
        if not self.d.agree([not bool(finite)])[0]:
            self.in_row = 0
            return True
        if self.policy == "skip" and self.in_row < self.max_skips:
            self.in_row += 1
            with torch.no_grad():
                for b, s in zip(module.buffers(), saved):
                    b.copy_(s)
            if self.d.main:
                print(f"warning: non-finite {where}: step skipped ({self.in_row} in a row)",
                      file=sys.stderr, flush=True)
            return False
        if self.policy == "skip":
            where += f", after {self.max_skips} skipped steps in a row (--nonfinite-skips)"
        raise RunStopped(f"non-finite values ({where}); likely cause: {hint}; the last good "
                         "checkpoint is untouched")
