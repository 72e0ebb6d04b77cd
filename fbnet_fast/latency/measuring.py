"""Measuring latency tables on this machine (CPU or CUDA; eager PyTorch or ONNX Runtime).

Methods (``method=``, recorded in the table):

- ``naive``: each op timed alone, benchmark-style (``timing.benchmark``: warm-up, then
  runs in a row, median). Its weights and input stay in cache, so it under-predicts
  whole networks (a block inside a network runs with a cold cache). In ONNX Runtime
  (``runtime="onnxruntime"``) each op is exported and run as its own session.
- ``context`` (eager PyTorch only): ops timed *inside* whole networks. Every round runs K
  networks whose layer l uses candidate perm_l[j] (a fresh random permutation per layer
  and round), so each (layer, candidate) runs once per round, behind random neighbours,
  and a timestamp (CUDA: an event) between consecutive blocks gives each block's time in
  the cache and allocator state it has in a real network. Stem and head are timed in the
  same passes. Entries of identical shapes pool the samples of all their layers.
- ``calibrated``: the entries (``context`` in PyTorch, ``naive`` in ONNX Runtime) plus one
  scale factor: the median of measured / predicted over ``calib_samples`` random
  architectures (a fixed seed; ``fbnet-fast lut validate`` excludes them) timed
  benchmark-style right after the entries.
- ``fitted``: the same entries plus a fixed per-network cost and one scale per candidate
  type, fitted by least squares to whole networks timed benchmark-style (``fit_lstsq``):
  it models what the sum of blocks misses (framework overhead per network and per
  block, cache state at block boundaries that depends on the op type).

- ``regressed``: the same entries plus a fixed per-network cost and a correction per
  entry, fitted by ridge regression (``fit_ridge``) to 200 whole networks timed once
  each: every entry's cost as whole networks see it, drawn towards its measured value
  where the networks cannot tell. In ONNX Runtime, where no timestamp can be taken
  between the blocks of a session, this is how ops are timed in context (the default
  there).

``calibrate`` fits any of these corrections to any table (naive, imported) from networks timed
afterwards.

Noise control: entries whose spread (IQR / median) exceeds ``rel_tol`` are re-measured up
to ``retries`` times, keeping the narrowest sample set; with ``ci=`` instead, entries are
re-measured (samples pooled) until the 95 % confidence interval of their median is within
``ci`` of it. Entries breaking an obvious ordering (e6 faster than e3, k5 faster than k3,
...) beyond their confidence intervals are re-measured once with the new samples pooled,
and flagged in the table if the violation remains.
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
from .keys import (arch_keys, block_keys, head_key, layer_keys, parse_block_key, parse_key,
                   required_keys, stem_key)
from .runtimes import (chain, check_runtime, export_many, identity_model, ort_runner,
                       ort_session, runners, runtime_meta, table_runtime)
from .table import LatencyTable
from .timing import (SegmentTimer, benchmark, device_info, progress_bar, resolve_device,
                     heap_is_steady, threads_set, torch_runner)

__all__ = ["measure", "calibrate", "measure_networks", "stats", "median_ci", "fit_lstsq",
           "fit_ridge", "order_violations", "METHODS", "FITS", "HeadPoolFC"]

METHODS = ("naive", "context", "calibrated", "fitted", "regressed")
# the whole-network fit of each method
FITS = {"calibrated": "scale", "fitted": "lstsq", "regressed": "ridge"}
# the method that predicted whole networks best in each runtime (docs/latency.md)
DEFAULT_METHOD = {"torch": "calibrated", "onnxruntime": "regressed"}
CALIB_SEED = 1_000_003   # seeds the calibration networks (validate excludes them)
# benchmark protocol of the whole networks each fit times: (reps, warmup, rounds); the
# ridge fit times hundreds of networks once each, in random order
FIT_TIMING = {"scale": (10, 5, 2), "lstsq": (10, 5, 2), "ridge": (10, 10, 1)}
FIT_SAMPLES = {"scale": 24, "lstsq": 24, "ridge": 200}   # whole networks per fit
# the ridge fit's prior: a network's median is known within RIDGE_NOISE of it, and an
# entry's correction is of the order of one of RIDGE_PRIORS of the entry (the one
# cross-validation on the fit networks picks)
RIDGE_NOISE, RIDGE_PRIORS = 0.01, (0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5)


def median_ci(samples, z: float = 1.96) -> float:
    """Half-width of the distribution-free 95 % confidence interval of the median, over
    the median: the order statistics at ranks n/2 -+ z*sqrt(n)/2 (binomial), so it holds
    for skewed timing distributions; 0.02 = the median is known within 2 %."""
    a = np.sort(np.asarray(samples, dtype=np.float64))
    n = a.size
    lo = max(int(np.floor((n - z * np.sqrt(n)) / 2)) - 1, 0)
    hi = min(int(np.ceil(1 + (n + z * np.sqrt(n)) / 2)) - 1, n - 1)
    med = float(np.median(a))
    return float((a[hi] - a[lo]) / 2 / med) if med > 0 else 0.0


def stats(samples) -> Entry:
    """Median, mean, spread (IQR / median), count and confidence (``median_ci``) in ms."""
    a = np.asarray(samples, dtype=np.float64)
    med = float(np.median(a))
    q1, q3 = np.percentile(a, [25, 75])
    return Entry(med, float(a.mean()), float((q3 - q1) / med) if med > 0 else 0.0, int(a.size),
                 ci=median_ci(a))


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


def _op_modules(keys, c) -> tuple:
    """(modules in eval mode, inputs) of op keys, with the settings of ``c``: device,
    dtype, memory_format, batch and the generator ``gen``."""
    mods, xs = [], []
    for key in keys:
        mod, ch, h = _module_for(key)
        mods.append(_prepare(mod, c["device"], c["dtype"], c["memory_format"]))
        xs.append(_input(ch, h, c["batch"], c["device"], c["dtype"], c["memory_format"],
                         c["gen"]))
    return mods, xs


def _prepare(module, device, dtype, memory_format):
    return module.eval().to(device=device, dtype=dtype, memory_format=memory_format)


def _input(c, h, batch, device, dtype, memory_format, gen):
    x = torch.randn(batch, c, h, h, generator=gen, dtype=dtype)
    return x.to(device=device, memory_format=memory_format)


# --- methods ------------------------------------------------------------------------

class _Naive:
    """Each op alone, benchmark-style: warm-up, ``reps`` timed runs in a row, in the
    table's runtime (every op built, and for ONNX Runtime exported, once).

    In ONNX Runtime every op is a session of its own and pays a session run's fixed cost,
    which a network pays once: that cost (``overhead``, the median run of an empty
    model) is taken off every op's runs but the stem's, so the stem carries the
    network's one run (and a table sums to a network, not to 24 runs).
    """

    def __init__(self, keys, ctx):
        self.keys, self.ctx = keys, ctx
        c = ctx
        mods, xs = _op_modules(keys, c)
        self.onnx, self.overhead = None, None
        if c["runtime"] == "onnxruntime":
            # the ops' ONNX models, kept to chain the fit networks from (measure_networks)
            self.onnx = dict(zip(keys, export_many(mods, xs)))
            empty = ort_runner(ort_session(identity_model(), c["threads"]), torch.zeros(1))
            self.overhead = float(np.median(benchmark([empty], c["reps"], c["warmup"])[0]))
        self.runs = dict(zip(keys, runners(mods, xs, c["runtime"], c["device"], c["threads"],
                                           self.onnx and list(self.onnx.values()))))

    def units(self):
        return 1

    def run(self, keys, bar):
        c = self.ctx
        got = benchmark([self.runs[k] for k in keys], c["reps"], c["warmup"])
        bar.update(1)
        if self.overhead:
            got = [s if parse_key(k).kind == "stem" else [max(t - self.overhead, 0.0) for t in s]
                   for k, s in zip(keys, got)]
        return dict(zip(keys, got))


class _Context:
    """Ops timed inside whole networks (balanced random design, see module docstring)."""

    onnx = overhead = None   # eager PyTorch only: no ONNX models, no per-session cost

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
            bar.update(1)
        return out

    def run(self, keys, bar):
        got = self.rounds(self.ctx["reps"], bar)
        return {k: got[k] for k in keys}


# --- main entry ---------------------------------------------------------------------

def measure(space: SearchSpace | None = None, device="cpu", batch: int = 1,
            threads: int | None = None, method: str | None = None, reps: int | None = None,
            warmup: int | None = None, num_classes: int = 1000, dtype=torch.float32,
            memory_format: str = "contiguous", rel_tol: float = 0.15, abs_tol_ms: float = 0.005,
            retries: int | None = None, order_tol: float = 0.03,
            calib_samples: int | None = None, seed: int = 0, progress: bool = True,
            runtime: str = "torch", ci: float | None = None,
            max_rounds: int = 10, steady: bool = True) -> LatencyTable:
    """Measure a latency table of ``space`` (default: the paper's, 224x224, width 1).

    reps: timed runs per op (naive, default 100) or rounds of K networks (context,
    default 20: every (layer, candidate) is timed ``reps`` times; shapes shared by
    several layers get more samples). warmup: untimed runs per op (naive, default 10) or
    untimed rounds (default 2). retries: re-measurements of wide entries (default 2
    naive, 1 context: a context re-measurement re-runs every round). threads: intra-op
    threads while measuring (default: torch's current setting), restored afterwards.
    method: default ``DEFAULT_METHOD`` of the runtime (calibrated in torch, regressed
    in ONNX Runtime). calib_samples: whole networks (FBNet models, a fixed seed) timed
    for the fit (``FIT_SAMPLES``: 24 calibrated and fitted, 200 regressed). runtime:
    ``torch`` (eager) or ``onnxruntime`` (the extra ``fbnet_fast[onnx]``; every op
    exported with ``torch.onnx``). ci: instead
    of ``retries``, re-measure entries (``reps`` more runs or rounds at a time, at most
    ``max_rounds`` times) until the 95 % confidence interval of each median is within
    ``ci`` (0.02 = 2 %) of it; what stays wider is flagged. steady: pin glibc's heap
    first (``timing.steady_heap``, for the rest of the process); a process that goes on to
    train passes False, as a pinned heap keeps its peak memory (the quick search's max
    RSS 1.40 against 1.23 GB).
    """
    space = space or SearchSpace()
    method = method or DEFAULT_METHOD.get(runtime, "calibrated")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if memory_format not in ("contiguous", "channels_last"):
        raise ValueError(f"memory_format must be contiguous or channels_last, "
                         f"got {memory_format!r}")
    dev = resolve_device(device)
    check_runtime(runtime, dev, dtype, memory_format)
    if runtime == "onnxruntime" and method == "context":
        raise ValueError("method 'context' times blocks inside eager PyTorch networks; in "
                         "ONNX Runtime use naive, calibrated or fitted")
    naive = method == "naive" or runtime == "onnxruntime"
    reps = reps if reps is not None else (100 if naive else 20)
    warmup = warmup if warmup is not None else (10 if naive else 2)
    retries = retries if retries is not None else (0 if ci else 2 if naive else 1)
    if reps < 3:
        raise ValueError(f"reps must be >= 3 for a median and a spread, got {reps}")
    if ci is not None and not 0 < ci < 1:
        raise ValueError(f"ci must be a fraction in (0, 1), e.g. 0.02, got {ci}")
    keys = required_keys(space, num_classes)
    fit = FITS.get(method)
    calib_samples = calib_samples if calib_samples is not None else FIT_SAMPLES.get(fit)
    if fit and calib_samples < 1:
        raise ValueError(f"method {method!r} needs calib_samples >= 1 whole networks")
    if fit == "lstsq" and calib_samples < len(space.candidates) + 1:
        raise ValueError(f"method 'fitted' fits {len(space.candidates) + 1} numbers: it needs "
                         f"calib_samples >= {len(space.candidates) + 1} whole networks")
    wide = (lambda a: median_ci(a) > ci) if ci else (
        lambda a: _wide(a, rel_tol, abs_tol_ms))
    t0 = time.perf_counter()
    with threads_set(threads, steady) as nthreads, torch.inference_mode():
        ctx = {"device": dev, "dtype": dtype, "batch": batch, "reps": reps, "warmup": warmup,
               "timer": SegmentTimer(dev), "gen": torch.Generator().manual_seed(seed),
               "seed": seed, "runtime": runtime, "threads": nthreads,
               "memory_format": torch.channels_last
               if memory_format == "channels_last" else torch.contiguous_format}
        runner = _Naive(keys, ctx) if naive else _Context(space, num_classes, ctx)
        with progress_bar(runner.units(), f"lut measure ({method}, {runtime})",
                          progress) as bar:
            if not naive:
                runner.rounds(warmup, bar, record=False)
            samples = runner.run(keys, bar)
        warnings = _noise_control(runner, samples, wide, retries, order_tol, progress,
                                  retries > 0 or ci is not None)
        if ci:
            warnings += _until_ci(runner, samples, ci, max_rounds, progress)
        entries = {}
        for k in keys:
            entries[k] = stats(samples[k])
        warnings += _flag(entries, samples, wide, rel_tol, ci, order_tol)
        meta = {
            "device": device_info(dev), **runtime_meta(runtime),
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
            "batch": batch, "threads": nthreads, "memory_format": memory_format,
            "method": method, "reps": reps, "warmup": warmup, "statistic": "median",
            "heap": "steady" if heap_is_steady() else "default",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if ci:
            meta["ci_target"] = ci
        if runner.overhead is not None:
            meta["run_overhead_ms"] = runner.overhead
        if not naive:
            # whole-network time of each pass over the sum of its entries' medians: how much
            # the median-of-parts misses of the whole (noise bursts, context); informative
            ratios = [tot / sum(entries[k].median for k in ks) for ks, tot in runner.passes]
            meta["pass_ratio"] = {"median": float(np.median(ratios)),
                                  "iqr": [float(q) for q in np.percentile(ratios, [25, 75])],
                                  "passes": len(ratios)}
        table = LatencyTable(entries, meta, space.to_dict(), num_classes, None, warnings)
    if fit:
        calibrate(table, space, calib_samples, CALIB_SEED, device, batch, nthreads,
                  num_classes=num_classes, memory_format=memory_format, dtype=dtype,
                  progress=progress, fit=fit, runtime=runtime, parts=runner.onnx,
                  steady=steady)
    table.meta["seconds"] = round(time.perf_counter() - t0, 1)
    return table


# --- noise control ----------------------------------------------------------------

def order_violations(values: dict, tol: float = 0.03, ci: dict | None = None) -> list:
    """Pairs that break obvious orderings at one layer shape, as ``(fast, slow, ratio)``.

    Expected: for equal kernel and groups, e1 <= e3 <= e6; for equal expansion and groups,
    k3 <= k5. A pair is reported when the op expected to be slower is faster by more
    than ``tol`` (relative), i.e. ``values[slow] < (1 - tol) * values[fast]``; with ``ci``
    (each key's relative confidence half-width) only when it is faster by more than
    ``tol`` plus both intervals, so what is flagged is real, not noise.
    """
    ci = ci or {}
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
                margin = tol + ci.get(key, 0.0) + ci.get(ops.get(b), 0.0)
                if b in ops and values[ops[b]] < (1 - margin) * values[key]:
                    out.append((key, ops[b], values[ops[b]] / values[key]))
    return out


def _noise_control(runner, samples, wide, retries, order_tol, progress, order_again) -> list:
    """Re-measure wide entries (keep the narrowest set) and, if ``order_again``, order
    violations (pool)."""
    notes = []
    for attempt in range(retries):
        again = [k for k, s in samples.items() if wide(s)]
        if not again:
            break
        fresh = _remeasure(runner, again, f"re-measure {len(again)} wide", progress)
        for k in again:
            if stats(fresh[k]).spread < stats(samples[k]).spread:
                samples[k] = fresh[k]
        notes.append(f"re-measured {len(again)} wide entries (attempt {attempt + 1})")
    bad = sorted({k for a, b, _ in order_violations(_medians(samples), order_tol,
                                                     _cis(samples)) for k in (a, b)})
    if bad and order_again:
        fresh = _remeasure(runner, bad, f"re-measure {len(bad)} out of order", progress)
        for k in bad:
            samples[k] = list(samples[k]) + list(fresh[k])
        notes.append(f"re-measured {len(bad)} entries breaking an ordering (samples pooled)")
    return notes


def _until_ci(runner, samples, ci, max_rounds, progress) -> list:
    """Pool more runs into the entries whose median is not yet known within ``ci``."""
    for step in range(max_rounds):
        again = [k for k, s in samples.items() if median_ci(s) > ci]
        if not again:
            return [f"every entry within the {ci:.1%} confidence target after {step} "
                    "extra round(s)"]
        fresh = _remeasure(runner, again, f"{len(again)} entries above ci {ci:.1%}", progress)
        for k in again:
            samples[k] = list(samples[k]) + list(fresh[k])
    return []


def _remeasure(runner, keys, desc, progress) -> dict:
    total = 1 if isinstance(runner, _Naive) else runner.ctx["reps"]
    with progress_bar(total, desc, progress) as bar:
        return runner.run(keys, bar)


def _medians(samples) -> dict:
    return {k: float(np.median(s)) for k, s in samples.items()}


def _cis(samples) -> dict:
    return {k: median_ci(s) for k, s in samples.items()}


def _flag(entries, samples, wide, rel_tol, ci, order_tol) -> list:
    """Flag noisy entries and ordering violations; returns the table-level warnings."""
    noisy = [k for k, s in samples.items() if wide(s)]
    for k in noisy:
        e = entries[k]
        entries[k].flags.append(f"noisy: ci {e.ci:.1%} > {ci:.1%}" if ci else
                                f"noisy: spread {e.spread:.0%} > {rel_tol:.0%}")
    out = [f"{len(noisy)} of {len(entries)} entries still noisy after re-measuring "
           "(flag 'noisy'); the machine was busy or the op is too short to time"] if noisy else []
    med = {k: e.median for k, e in entries.items()}
    for fast, slow, ratio in order_violations(med, order_tol, _cis(samples)):
        entries[slow].flags.append(f"order: faster than {fast.split(':')[0]} "
                                   f"({ratio:.2f}x)")
        entries[fast].flags.append(f"order: slower than {slow.split(':')[0]}")
        out.append(f"order: {slow} takes {ratio:.2f}x the time of {fast.split(':')[0]}")
    return out


# --- whole networks ------------------------------------------------------------------

def measure_networks(archs, device="cpu", batch: int = 1, threads: int | None = None,
                     reps: int = 20, warmup: int = 10, rounds: int = 2,
                     num_classes: int = 1000, memory_format: str = "contiguous",
                     dtype=torch.float32, seed: int = 0, progress: bool = True,
                     runtime: str = "torch", parts: dict | None = None,
                     raw: bool = False, steady: bool = True) -> list:
    """Whole-network latency statistics (``Entry`` in ms) per architecture, benchmark-style;
    ``raw=True``: each network's run times instead (ms, round after round).

    ``timing.benchmark``: one network at a time, ``warmup`` runs then ``reps`` timed runs
    in a row, every network once per round, ``rounds`` rounds; the median of its
    ``reps * rounds`` runs. ``runtime="onnxruntime"`` exports each network with
    ``torch.onnx`` and times it in ONNX Runtime; with ``parts`` (op key -> ONNX model,
    extended with the ops it lacks) it chains each network from its ops' models instead
    (``runtimes.chain``: the same graph, without a whole-network export's cost).
    ``steady``: pin glibc's heap first (``measure``).
    """
    dev = resolve_device(device)
    check_runtime(runtime, dev, dtype, memory_format)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    with threads_set(threads, steady) as nthreads, torch.inference_mode():
        gen = torch.Generator().manual_seed(seed)
        xs = [torch.randn(batch, 3, a.space.resolution, a.space.resolution, generator=gen,
                          dtype=dtype).to(dev, memory_format=fmt) for a in archs]

        def build(a):
            return create_model(a, num_classes).eval().to(dev, dtype, memory_format=fmt)

        # factories: every network is built at its turn and dropped after it (benchmark's
        # ``lazy``), so hundreds of networks never live at once
        if runtime == "torch":
            makers = [lambda a=a, x=x: torch_runner(build(a), x, dev) for a, x in zip(archs, xs)]
        else:
            if parts is None:
                models = [lambda m=m: m for m in export_many([build(a) for a in archs], xs)]
            else:
                keys = [arch_keys(a, num_classes) for a in archs]
                new = list(dict.fromkeys(k for ks in keys for k in ks if k not in parts))
                if new:
                    parts.update(zip(new, export_many(*_op_modules(new, {
                        "device": dev, "dtype": dtype, "memory_format": fmt, "batch": batch,
                        "gen": gen}))))
                models = [lambda ks=ks: chain([parts[k] for k in ks]) for ks in keys]
            makers = [lambda m=m, x=x: ort_runner(ort_session(m(), nthreads), x)
                      for m, x in zip(models, xs)]
        with progress_bar(rounds, f"whole networks ({runtime})", progress) as bar:
            samples = benchmark(makers, reps, warmup, rounds, on_round=lambda: bar.update(1),
                                lazy=True)
    return samples if raw else [stats(s) for s in samples]


# --- fitting a table to whole networks -----------------------------------------------

def fit_lstsq(features, measured, names) -> tuple:
    """Least squares ``measured = offset + sum_g scale_g * features[:, g]``.

    features[n, g]: the table's (uncorrected) time of op type g in network n; measured[n]:
    the network's time minus the fixed parts. Returns ``(offset_ms, {name: scale})``. A
    type that never occurs keeps scale 1. When the networks cannot tell the types apart
    (too few, or a scale comes out <= 0), one common scale and the offset are fitted
    instead, and failing that the median ratio alone (no offset), as ``calibrated``.
    """
    f, y = np.asarray(features, float), np.asarray(measured, float)
    used = [g for g in range(f.shape[1]) if f[:, g].any()]
    total = f[:, used].sum(1)
    for x in (f[:, used], total[:, None]):
        a = np.hstack([np.ones((len(y), 1)), x])
        coef, _, rank, _ = np.linalg.lstsq(a, y, rcond=None)
        if rank == a.shape[1] and (coef[1:] > 0).all():
            break
    else:
        ok = total > 0
        coef = np.array([0.0, np.median(y[ok] / total[ok]) if ok.any() else 0.0])
        if not coef[1] > 0:
            raise ValueError("the whole networks ran faster than the table's fixed parts "
                             "alone: re-measure the table")
    per_type = coef[1:] if len(coef) == len(used) + 1 else [coef[1]] * len(used)
    scales = {n: 1.0 for n in names}
    scales.update({names[g]: float(c) for g, c in zip(used, per_type)})
    return float(coef[0]), scales


def _ridge(x, r, base, noise, prior) -> np.ndarray:
    a = np.hstack([np.ones((len(r), 1)), x])
    penalty = np.diag(np.r_[0.0, (noise / (prior * base)) ** 2])
    return np.linalg.solve(a.T @ a + penalty, a.T @ r)


def fit_ridge(features, residual, base, measured, folds: int = 5) -> tuple:
    """Ridge regression ``residual = offset + features @ d``: an offset paid once per
    network and a correction ``d_k`` per entry, each drawn towards 0 by a prior of
    ``prior * base_k`` against the networks' noise (``RIDGE_NOISE`` of their median time),
    so entries the networks barely tell apart keep their measured value. The prior's
    width is the one of ``RIDGE_PRIORS`` that predicts held-out networks best (``folds``-
    fold cross-validation on these networks; the networks ``validate`` times play no
    part). No entry is corrected below zero. Returns ``(offset_ms, d, prior)``.
    """
    x, r = np.asarray(features, float), np.asarray(residual, float)
    y = np.asarray(measured, float)
    base = np.maximum(np.asarray(base, float), 1e-3)
    noise = RIDGE_NOISE * float(np.median(y))
    fold = np.arange(len(r)) % folds
    prior = RIDGE_PRIORS[0]
    if len(r) >= 2 * folds:
        def held_out_error(p):
            err = []
            for f in range(folds):
                fit, out = fold != f, fold == f
                coef = _ridge(x[fit], r[fit], base, noise, p)
                err.append(np.abs(coef[0] + x[out] @ coef[1:] - r[out]) / y[out])
            return float(np.mean(np.concatenate(err)))
        prior = min(RIDGE_PRIORS, key=held_out_error)
    coef = _ridge(x, r, base, noise, prior)
    return float(coef[0]), np.maximum(coef[1:], -base), prior


def _fit(table, archs, meas, seed, how, fit, nc) -> None:
    """Set ``table.calibration`` from whole networks: one scale (median of measured /
    predicted), the least-squares offset and per-type scales, or the ridge offset and
    per-entry corrections."""
    table.calibration = None
    meas_ms = [m.median for m in meas]
    raw = [table.latency(a, nc) for a in archs]
    cal = {"fit": how, "seed": seed, "runs": [m.count for m in meas],
           "networks": [list(a.blocks) for a in archs], "measured_ms": meas_ms,
           "predicted_ms": raw}
    space = archs[0].space
    if fit == "scale":
        cal["scale"] = float(np.median([m / p for m, p in zip(meas_ms, raw)]))
    elif fit == "lstsq":
        names = list(space.candidates)
        feats = np.zeros((len(archs), len(names)))
        for n, a in enumerate(archs):
            for name, key in zip(a.blocks, arch_keys(a, nc)[1:-1]):
                feats[n, names.index(name)] += table.value(key)
        offset, scales = fit_lstsq(feats, np.asarray(meas_ms) - table.fixed_ms(space, nc),
                                   names)
        cal.update({"scale": 1.0, "offset_ms": offset, "type_scales": scales})
    else:
        keys = block_keys(space)
        col = {k: i for i, k in enumerate(keys)}
        feats = np.zeros((len(archs), len(keys)))
        for n, a in enumerate(archs):
            for key in arch_keys(a, nc)[1:-1]:
                feats[n, col[key]] += 1
        offset, d, prior = fit_ridge(feats, np.asarray(meas_ms) - raw,
                                     [table.value(k) for k in keys], meas_ms)
        cal.update({"scale": 1.0, "offset_ms": offset, "ridge_prior": prior,
                    "entry_ms": {k: float(v) for k, v in zip(keys, d) if v}})
    table.calibration = cal
    if fit != "scale":
        fastest = float(table.layer_matrix(space).min(1).values.sum()) + table.fixed_ms(space, nc)
        if fastest <= 0:   # a negative offset the smallest networks cannot carry
            return _fit(table, archs, meas, seed, how + f"; one scale: {fit} predicted "
                        f"{fastest:.3f} ms for the fastest architecture", "scale", nc)
    cal["fitted_ms"] = [table.latency(a, nc) for a in archs]   # predicted after the fit


def calibrate(table: LatencyTable, space: SearchSpace | None = None,
              samples: int | None = None,
              seed: int = CALIB_SEED, device="cpu", batch: int = 1, threads: int | None = None,
              reps: int | None = None, warmup: int | None = None,
              num_classes: int | None = None, memory_format: str = "contiguous",
              dtype=torch.float32, progress: bool = True, fit: str = "scale",
              runtime: str | None = None, rounds: int | None = None,
              parts: dict | None = None, steady: bool = True) -> LatencyTable:
    """Fit the table to whole networks (in place; returns the table).

    Times ``samples`` random architectures (seeded, uniform per layer; ``FIT_SAMPLES``
    unless given) benchmark-style (``FIT_TIMING`` unless given) in the table's runtime
    and fits ``fit="scale"``: ``scale = median(measured / predicted)``, one parameter,
    robust to an outlier network; ``fit="lstsq"`` (``fit_lstsq``): a fixed per-network
    cost and one scale per candidate type; or ``fit="ridge"`` (``fit_ridge``): a fixed
    per-network cost and a correction per entry. The architectures are recorded so
    validation can exclude them. In ONNX Runtime the networks are chained from their ops'
    models (``parts``: op key -> ONNX model; the ops not in it are exported), so fitting
    stays within the time budget.
    """
    space = space or table.space
    if fit not in FITS.values():
        raise ValueError(f"fit must be one of {', '.join(FITS.values())}, got {fit!r}")
    samples = FIT_SAMPLES[fit] if samples is None else samples
    if samples < 1:
        raise ValueError(f"calibration needs >= 1 network, got {samples}")
    nc = num_classes or table.num_classes or 1000
    if space is None:
        raise ValueError("the table records no search space; pass space=...")
    d_reps, d_warmup, d_rounds = FIT_TIMING[fit]
    runtime = runtime or table_runtime(table.meta)
    archs = sample_architectures(space, samples, seed)
    meas = measure_networks(archs, device=device, batch=batch, threads=threads,
                            reps=reps or d_reps, warmup=d_warmup if warmup is None else warmup,
                            rounds=rounds or d_rounds, num_classes=nc,
                            memory_format=memory_format, dtype=dtype, progress=progress,
                            runtime=runtime, parts={} if parts is None else parts,
                            steady=steady)
    how = {"scale": "median of measured/predicted",
           "lstsq": "least squares: offset + one scale per candidate type",
           "ridge": "ridge regression: offset + one correction per entry"}[fit] + \
        "; networks timed benchmark-style after the entries"
    _fit(table, archs, meas, seed, how, fit, nc)
    return table
