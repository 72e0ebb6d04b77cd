"""Measuring latency tables on this machine (CPU or CUDA).

Methods (``method=``, recorded in the table):

- ``naive``: each op timed alone in a loop. Its weights and input stay in cache, so it
  under-predicts whole networks (a block inside a network runs with a cold cache).
- ``context``: ops timed *inside* whole networks. Every round runs K networks whose
  layer l uses candidate perm_l[j] (a fresh random permutation per layer and round), so
  each (layer, candidate) runs once per round, behind random neighbours, and a
  timestamp (CUDA: an event) between consecutive blocks gives each block's time in the
  cache and allocator state it has in a real network. Stem and head are timed in the
  same passes. Entries of identical shapes pool the samples of all their layers.
- ``calibrated``: ``context`` plus one scale factor fitted to whole networks: the median
  of measured / predicted over ``calib_samples`` random architectures (a fixed seed;
  ``fbnet-fast lut validate`` excludes them), each timed once per round between the
  context passes, so the fit sees the same machine load as the entries.
  ``calibrate`` fits the same scale to any table (naive, imported) from networks timed
  afterwards.

Noise control: entries whose spread (IQR / median) exceeds ``rel_tol`` are re-measured up
to ``retries`` times, keeping the narrowest sample set; entries breaking an obvious
ordering (e6 faster than e3, k5 faster than k3, ...) are re-measured once with the new
samples pooled, and flagged in the table if the violation remains.
"""
from __future__ import annotations

import datetime
import random
import time

import numpy as np
import torch
from torch import nn

from ..nn.architecture import sample_architectures
from ..nn.blocks import ConvBNReLU, build_block
from ..nn.models import create_model
from ..nn.space import SearchSpace, parse_candidate
from .formats import Entry
from .keys import head_key, layer_keys, parse_block_key, parse_key, required_keys, stem_key
from .table import LatencyTable
from .timing import SegmentTimer, device_info, progress_bar, resolve_device, threads_set

__all__ = ["measure", "calibrate", "measure_networks", "stats", "order_violations",
           "METHODS", "HeadPoolFC"]

METHODS = ("naive", "context", "calibrated")
DEFAULT_METHOD = "calibrated"
CALIB_SEED = 1_000_003   # seeds the calibration networks (validate excludes them)


def stats(samples) -> Entry:
    """Median, mean, spread (IQR / median) and count of samples in ms."""
    a = np.asarray(samples, dtype=np.float64)
    med = float(np.median(a))
    q1, q3 = np.percentile(a, [25, 75])
    return Entry(med, float(a.mean()), float((q3 - q1) / med) if med > 0 else 0.0, int(a.size))


def _wide(samples, rel_tol: float, abs_tol_ms: float) -> bool:
    a = np.asarray(samples)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return (q3 - q1) > max(rel_tol * med, abs_tol_ms)


class HeadPoolFC(nn.Sequential):
    """The fixed end of an FBNet: 1x1 head conv + BN + ReLU, global pool, linear."""

    def __init__(self, c_in: int, c_head: int, num_classes: int):
        super().__init__(ConvBNReLU(c_in, c_head, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                         nn.Linear(c_head, num_classes))


def _module_for(key: str):
    """(module, input C, input H) for an op key."""
    k = parse_key(key)
    if k.kind == "block":
        module = build_block(k.name, k.in_channels, k.out_channels, k.stride)
    elif k.kind == "stem":
        module = ConvBNReLU(k.in_channels, k.out_channels, 3, k.stride)
    else:
        module = HeadPoolFC(k.in_channels, k.out_channels, k.num_classes)
    return module, k.in_channels, k.size


def _prepare(module, device, dtype, memory_format):
    return module.eval().to(device=device, dtype=dtype, memory_format=memory_format)


def _input(c, h, batch, device, dtype, memory_format, gen):
    x = torch.randn(batch, c, h, h, generator=gen, dtype=dtype)
    return x.to(device=device, memory_format=memory_format)


# --- methods ------------------------------------------------------------------------

class _Naive:
    """Each op alone in a loop: warm-up, ``reps`` timed calls."""

    def __init__(self, keys, ctx):
        self.keys, self.ctx = keys, ctx

    def units(self):
        return len(self.keys)

    def run(self, keys, bar):
        c = self.ctx
        out = {}
        for key in keys:
            mod, ch, h = _module_for(key)
            mod = _prepare(mod, c["device"], c["dtype"], c["memory_format"])
            x = _input(ch, h, c["batch"], c["device"], c["dtype"], c["memory_format"], c["gen"])
            for _ in range(c["warmup"]):
                mod(x)
            out[key] = [c["timer"]([mod], x)[0] for _ in range(c["reps"])]
            bar.update(1)
        return out


class _Context:
    """Ops timed inside whole networks (balanced random design, see module docstring)."""

    def __init__(self, space, num_classes, ctx):
        self.space, self.ctx = space, ctx
        c = ctx
        prep = lambda m: _prepare(m, c["device"], c["dtype"], c["memory_format"])  # noqa: E731
        self.keys = layer_keys(space)
        self.stem = prep(ConvBNReLU(3, space.stem_out, 3, space.effective_stem_stride))
        self.blocks = [[prep(build_block(n, l.in_channels, l.out_channels, l.stride))
                        for n in space.candidates] for l in space.layers()]
        last = space.layers()[-1]
        self.head = prep(HeadPoolFC(last.out_channels, space.head_out, num_classes))
        self.stem_key, self.head_key = stem_key(space), head_key(space, num_classes)
        self.x = _input(3, space.resolution, c["batch"], c["device"], c["dtype"],
                        c["memory_format"], c["gen"])
        self.rng = random.Random(c["seed"])
        self.passes = []     # (keys, total ms) of every timed pass: whole networks for free
        # calibration networks, timed once per round between the passes (same load)
        self.calib = [(a, prep(create_model(a, num_classes)), []) for a in c["calib_archs"]]

    def units(self):
        return self.ctx["reps"] + self.ctx["warmup"]

    def rounds(self, n, bar, record=True):
        K = self.space.num_candidates
        out = {}
        for _ in range(n):
            perms = [self.rng.sample(range(K), K) for _ in self.blocks]
            for j in range(K):
                mods = [self.stem] + [row[p[j]] for row, p in zip(self.blocks, perms)] \
                    + [self.head]
                t = self.ctx["timer"](mods, self.x)
                if record:
                    keys = [self.stem_key] + [kr[p[j]] for kr, p in zip(self.keys, perms)] \
                        + [self.head_key]
                    for k, v in zip(keys, t):
                        out.setdefault(k, []).append(v)
                    self.passes.append((keys, sum(t)))
            for _, model, times in self.calib:
                t = self.ctx["timer"]([model], self.x)[0]
                if record:
                    times.append(t)
            bar.update(1)
        return out

    def run(self, keys, bar):
        got = self.rounds(self.ctx["reps"], bar)
        return {k: got[k] for k in keys}


# --- main entry ---------------------------------------------------------------------

def measure(space: SearchSpace | None = None, device="cpu", batch: int = 1,
            threads: int | None = None, method: str = DEFAULT_METHOD, reps: int | None = None,
            warmup: int | None = None, num_classes: int = 1000, dtype=torch.float32,
            memory_format: str = "contiguous", rel_tol: float = 0.15, abs_tol_ms: float = 0.005,
            retries: int | None = None, order_tol: float = 0.03, calib_samples: int = 8,
            seed: int = 0, progress: bool = True) -> LatencyTable:
    """Measure a latency table of ``space`` (default: the paper's, 224x224, width 1).

    reps: timed runs per op (naive, default 100) or rounds of K networks (context and
    calibrated, default 20: every (layer, candidate) is timed ``reps`` times; shapes
    shared by several layers get more samples). warmup: untimed calls per op (naive,
    default 10) or untimed rounds (default 2). retries: re-measurements of wide entries
    (default 2 naive, 1 context: a context re-measurement re-runs every round).
    threads: torch intra-op threads while measuring (default: the current setting),
    restored afterwards. calib_samples: whole networks (FBNet models, a fixed seed) timed
    once per round for ``method="calibrated"``.
    """
    space = space or SearchSpace()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if memory_format not in ("contiguous", "channels_last"):
        raise ValueError(f"memory_format must be contiguous or channels_last, "
                         f"got {memory_format!r}")
    dev = resolve_device(device)
    naive = method == "naive"
    reps = reps if reps is not None else (100 if naive else 20)
    warmup = warmup if warmup is not None else (10 if naive else 2)
    retries = retries if retries is not None else (2 if naive else 1)
    if reps < 3:
        raise ValueError(f"reps must be >= 3 for a median and a spread, got {reps}")
    keys = required_keys(space, num_classes)
    if method == "calibrated" and calib_samples < 1:
        raise ValueError("method 'calibrated' needs calib_samples >= 1 whole networks")
    calib_archs = (sample_architectures(space, calib_samples, CALIB_SEED)
                   if method == "calibrated" else [])
    with threads_set(threads) as nthreads, torch.inference_mode():
        ctx = {"device": dev, "dtype": dtype, "batch": batch, "reps": reps, "warmup": warmup,
               "timer": SegmentTimer(dev), "gen": torch.Generator().manual_seed(seed),
               "seed": seed, "calib_archs": calib_archs, "memory_format": torch.channels_last
               if memory_format == "channels_last" else torch.contiguous_format}
        runner = _Naive(keys, ctx) if naive else _Context(space, num_classes, ctx)
        t0 = time.perf_counter()
        with progress_bar(runner.units(), f"lut measure ({method})", progress) as bar:
            if not naive:
                runner.rounds(warmup, bar, record=False)
            samples = runner.run(keys, bar)
        warnings = _noise_control(runner, samples, rel_tol, abs_tol_ms, retries, order_tol,
                                  progress)
        entries = {}
        for k in keys:
            entries[k] = stats(samples[k])
        warnings += _flag(entries, samples, rel_tol, abs_tol_ms, order_tol)
        meta = {
            "device": device_info(dev), "runtime": f"pytorch {torch.__version__} eager",
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
            "batch": batch, "threads": nthreads, "memory_format": memory_format,
            "method": method, "reps": reps, "warmup": warmup, "statistic": "median",
            "seconds": round(time.perf_counter() - t0, 1),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if not naive:
            # whole-network time of each pass over the sum of its entries' medians: how much
            # the median-of-parts misses of the whole (noise bursts, context); informative
            ratios = [tot / sum(entries[k].median for k in ks) for ks, tot in runner.passes]
            meta["pass_ratio"] = {"median": float(np.median(ratios)),
                                  "iqr": [float(q) for q in np.percentile(ratios, [25, 75])],
                                  "passes": len(ratios)}
        table = LatencyTable(entries, meta, space.to_dict(), num_classes, None, warnings)
    if method == "calibrated":
        meas = [stats(times) for _, _, times in runner.calib]
        _fit_scale(table, calib_archs, meas, CALIB_SEED,
                   "median of measured/predicted; networks timed once per round, "
                   "interleaved with the context passes")
    return table


def _fit_scale(table, archs, meas, seed, how) -> None:
    table.calibration = None
    pred = [table.latency(a) for a in archs]
    ratios = [m.median / p for m, p in zip(meas, pred)]
    table.calibration = {
        "scale": float(np.median(ratios)), "fit": how, "seed": seed,
        "runs": [m.count for m in meas], "networks": [list(a.blocks) for a in archs],
        "measured_ms": [m.median for m in meas], "predicted_ms": pred,
    }


# --- noise control ----------------------------------------------------------------

def order_violations(values: dict, tol: float = 0.03) -> list:
    """Pairs that break obvious orderings at one layer shape, as ``(fast, slow, ratio)``.

    Expected: for equal kernel and groups, e1 <= e3 <= e6; for equal expansion and groups,
    k3 <= k5. A pair is reported when the op expected to be slower is faster by more
    than ``tol`` (relative), i.e. ``values[slow] < (1 - tol) * values[fast]``.
    """
    by_shape = {}
    for key, v in values.items():
        p = parse_block_key(key)
        if p and p[0] != "skip":
            spec = parse_candidate(p[0])
            by_shape.setdefault(p[1:], {})[(spec.kernel, spec.expansion, spec.groups)] = key
    out = []
    for shape, ops in by_shape.items():
        for (k, e, g), key in ops.items():
            bigger = [(k, e2, g) for e2 in sorted({o[1] for o in ops}) if e2 > e][:1]
            bigger += [(k2, e, g) for k2 in sorted({o[0] for o in ops}) if k2 > k][:1]
            for b in bigger:
                if b in ops and values[ops[b]] < (1 - tol) * values[key]:
                    out.append((key, ops[b], values[ops[b]] / values[key]))
    return out


def _noise_control(runner, samples, rel_tol, abs_tol_ms, retries, order_tol, progress) -> list:
    """Re-measure wide entries (keep the narrowest set) and order violations (pool)."""
    notes = []
    for attempt in range(retries):
        wide = [k for k, s in samples.items() if _wide(s, rel_tol, abs_tol_ms)]
        if not wide:
            break
        with progress_bar(len(wide) if isinstance(runner, _Naive) else runner.ctx["reps"],
                  f"re-measure {len(wide)} wide", progress) as bar:
            fresh = runner.run(wide, bar)
        for k in wide:
            if stats(fresh[k]).spread < stats(samples[k]).spread:
                samples[k] = fresh[k]
        notes.append(f"re-measured {len(wide)} entries with spread > {rel_tol:.0%} "
                     f"(attempt {attempt + 1})")
    med = {k: float(np.median(s)) for k, s in samples.items()}
    bad = sorted({k for a, b, _ in order_violations(med, order_tol) for k in (a, b)})
    if bad and retries > 0:
        with progress_bar(len(bad) if isinstance(runner, _Naive) else runner.ctx["reps"],
                  f"re-measure {len(bad)} out of order", progress) as bar:
            fresh = runner.run(bad, bar)
        for k in bad:
            samples[k] = list(samples[k]) + list(fresh[k])
        notes.append(f"re-measured {len(bad)} entries breaking an ordering (samples pooled)")
    return notes


def _flag(entries, samples, rel_tol, abs_tol_ms, order_tol) -> list:
    """Flag noisy entries and ordering violations; returns the table-level warnings."""
    noisy = [k for k, s in samples.items() if _wide(s, rel_tol, abs_tol_ms)]
    for k in noisy:
        entries[k].flags.append(f"noisy: spread {entries[k].spread:.0%} > {rel_tol:.0%}")
    out = [f"{len(noisy)} of {len(entries)} entries still noisy after re-measuring "
           "(flag 'noisy'); the machine was busy or the op is too short to time"] if noisy else []
    med = {k: e.median for k, e in entries.items()}
    for fast, slow, ratio in order_violations(med, order_tol):
        entries[slow].flags.append(f"order: faster than {fast.split(':')[0]} "
                                   f"({ratio:.2f}x)")
        entries[fast].flags.append(f"order: slower than {slow.split(':')[0]}")
        out.append(f"order: {slow} takes {ratio:.2f}x the time of {fast.split(':')[0]}")
    return out


# --- whole networks ------------------------------------------------------------------

def measure_networks(archs, device="cpu", batch: int = 1, threads: int | None = None,
                     reps: int = 20, warmup: int = 3, num_classes: int = 1000,
                     memory_format: str = "contiguous", dtype=torch.float32, seed: int = 0,
                     progress: bool = True) -> list:
    """Whole-network latency statistics (``Entry`` in ms) per architecture, interleaved."""
    dev = resolve_device(device)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    rng = random.Random(seed)
    timer = SegmentTimer(dev)
    samples = [[] for _ in archs]
    with threads_set(threads), torch.inference_mode():
        gen = torch.Generator().manual_seed(seed)
        models = [create_model(a, num_classes).eval().to(dev, dtype, memory_format=fmt)
                  for a in archs]
        xs = [torch.randn(batch, 3, a.space.resolution, a.space.resolution, generator=gen,
                          dtype=dtype).to(dev, memory_format=fmt) for a in archs]
        order = list(range(len(archs)))
        with progress_bar(warmup + reps, "whole networks", progress) as bar:
            for r in range(warmup + reps):
                rng.shuffle(order)
                for i in order:
                    t = timer([models[i]], xs[i])[0]
                    if r >= warmup:
                        samples[i].append(t)
                bar.update(1)
    return [stats(s) for s in samples]


# --- calibration --------------------------------------------------------------------

def calibrate(table: LatencyTable, space: SearchSpace | None = None, samples: int = 8,
              seed: int = CALIB_SEED, device="cpu", batch: int = 1, threads: int | None = None,
              reps: int = 15, warmup: int = 3, num_classes: int | None = None,
              memory_format: str = "contiguous", dtype=torch.float32,
              progress: bool = True) -> LatencyTable:
    """Fit one scale factor so the table predicts whole networks (in place; returns table).

    Measures ``samples`` random architectures (seeded, uniform per layer) the way
    ``validate`` does and sets ``scale = median(measured / predicted)``: one parameter,
    robust to an outlier network. The architectures are recorded so validation can
    exclude them.
    """
    space = space or table.space
    if samples < 1:
        raise ValueError(f"calibration needs >= 1 network, got {samples}")
    nc = num_classes or table.num_classes or 1000
    if space is None:
        raise ValueError("the table records no search space; pass space=...")
    archs = sample_architectures(space, samples, seed)
    meas = measure_networks(archs, device=device, batch=batch, threads=threads, reps=reps,
                            warmup=warmup, num_classes=nc, memory_format=memory_format,
                            dtype=dtype, progress=progress)
    _fit_scale(table, archs, meas, seed, "median of measured/predicted; networks timed "
               "after the table")
    return table
