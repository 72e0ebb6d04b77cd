"""How latencies are timed: the device, the thread count, a timer between modules, and
the benchmark protocol for whole networks.

A leaf of the latency package (it imports nothing from fbnet_fast): measuring tables
(``measuring.py``) and validating them (``validation.py``) both time with it.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import time

import torch
from tqdm.auto import tqdm

__all__ = ["device_info", "threads_set", "steady_heap", "heap_is_steady", "resolve_device",
           "SegmentTimer", "progress_bar", "benchmark", "torch_runner"]


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device),
                "cuda": torch.version.cuda}
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"type": device.type, "name": name, "cores": os.cpu_count()}


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters
_HEAP = {"steady": None}


def steady_heap() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the OS.

    By default glibc serves blocks above a threshold with fresh mappings and trims the
    heap's free top after every network run, so each eager run page-faults its
    activations in again (about 2,600 faults, 4 of 24 ms, for FBNet-C at 224x224, batch
    1); the thresholds then grow with the largest blocks freed so far, so the same
    network runs 1.1-1.9x slower early in a process than later. Pinned thresholds make
    every timing independent of what the process ran before. It lasts for the rest of
    the process (glibc cannot return to its adaptive thresholds); False where the C
    library is not glibc (nothing changed).
    """
    if _HEAP["steady"] is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            mallopt = libc.mallopt if libc is not None else None
        except (OSError, AttributeError):
            mallopt = None
        _HEAP["steady"] = bool(mallopt and mallopt(M_MMAP_THRESHOLD, 32 << 20)
                               and mallopt(M_TRIM_THRESHOLD, 1 << 30))
    return _HEAP["steady"]


def heap_is_steady() -> bool:
    """Whether ``steady_heap`` pinned this process's heap."""
    return bool(_HEAP["steady"])


@contextlib.contextmanager
def threads_set(threads: int | None, steady: bool = True):
    """Fix torch's intra-op thread count while measuring; restore it afterwards.

    Also flushes denormals (random weights can shrink activations into the denormal
    range, which slows CPUs far below what a trained network sees) and, with ``steady``,
    pins the heap (``steady_heap``).
    """
    if steady:
        steady_heap()
    old = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    flushed = torch.set_flush_denormal(True)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
        if flushed:
            torch.set_flush_denormal(False)


def resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available here; "
                         "use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return dev


class SegmentTimer:
    """Runs modules in sequence and returns each one's wall time in ms.

    CPU: ``time.perf_counter`` between modules (CPU ops are synchronous). CUDA: one event
    between modules, a single synchronisation at the end.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, modules, x) -> list:
        if self.cuda:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(len(modules) + 1)]
            ev[0].record()
            for m, e in zip(modules, ev[1:]):
                x = m(x)
                e.record()
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(ev, ev[1:])]
        t = [time.perf_counter()]
        for m in modules:
            x = m(x)
            t.append(time.perf_counter())
        return [(b - a) * 1e3 for a, b in zip(t, t[1:])]


def torch_runner(module, x, device: torch.device):
    """One inference of ``module`` on ``x`` as a callable for ``benchmark``; on CUDA it
    waits for the GPU, so the clock sees the whole run."""
    if device.type == "cuda":
        return lambda: (module(x), torch.cuda.synchronize())
    return lambda: module(x)


def benchmark(runs, reps: int, warmup: int, rounds: int = 1, clock=time.perf_counter,
              on_round=None, lazy: bool = False) -> list:
    """Times each callable of ``runs`` the way benchmark tools time a model; ms per run.

    One callable at a time: ``warmup`` untimed runs, then ``reps`` timed runs in a row,
    so every timed run follows a run of the same network (its own weights in cache), as
    in deployment. Whole rounds (every callable once) repeat ``rounds`` times, so a slow
    drift of the machine spreads over all callables instead of biasing one. Returns, per
    callable, its ``rounds * reps`` run times; ``clock`` is injectable for tests.
    ``lazy``: ``runs`` are factories of the callables, each called at its turn and the
    callable dropped after it, so a fit to hundreds of networks holds one at a time.
    """
    if reps < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"benchmark needs reps >= 1, warmup >= 0, rounds >= 1; got reps "
                         f"{reps}, warmup {warmup}, rounds {rounds}")
    out = [[] for _ in runs]
    for _ in range(rounds):
        for item, times in zip(runs, out):
            run = item() if lazy else item
            for _ in range(warmup):
                run()
            for _ in range(reps):
                t0 = clock()
                run()
                times.append((clock() - t0) * 1e3)
            del run
        if on_round is not None:
            on_round()
    return out


def progress_bar(total: int, desc: str, show: bool):
    return tqdm(total=total, desc=desc, unit="step", disable=not show, leave=False)
