"""Validating a latency table against whole networks measured the same way.

The additive model (sum of per-op latencies) is an approximation; ``validate`` samples
random architectures, times each whole network (eval mode, same batch, threads, device
and runtime as the table) and reports the mean absolute percentage error (MAPE) and the
Spearman rank correlation of predicted against measured latency. The networks are timed
the way benchmark tools time a model (``timing.benchmark``): one network at a time,
warm-up, then runs in a row, median; only whole rounds are interleaved, so a slow drift
of the machine spreads over all networks instead of biasing one.
"""
from __future__ import annotations

import numpy as np

from ..nn.architecture import resolve_arch, sample_architectures
from ..nn.space import SearchSpace
from .measuring import measure_networks, stats
from .runtimes import table_runtime
from .table import LatencyTable

__all__ = ["spearman", "mape", "repeatability", "validate", "validate_many"]

VALIDATE_SEED = 0


def _ranks(a) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(1, len(a) + 1)
    for v in np.unique(a):
        tie = a == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson correlation of the (tie-averaged) ranks."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("spearman needs two sequences of equal length >= 2")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def mape(predicted, measured) -> float:
    """Mean absolute percentage error, in percent of the measured values."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    return float(np.mean(np.abs(p - m) / m) * 100)


def validate(table: LatencyTable, samples: int = 20, seed: int = VALIDATE_SEED,
             space: SearchSpace | None = None, device: str | None = None,
             batch: int | None = None, threads: int | None = None, reps: int = 20,
             warmup: int = 10, num_classes: int | None = None, progress: bool = True,
             rounds: int = 2, runtime: str | None = None, archs=None) -> dict:
    """Predicted vs measured latency of ``samples`` random architectures.

    Settings default to those recorded in the table (device type, batch, threads,
    runtime); the table's calibration networks are excluded. Each network: ``warmup``
    runs, then ``reps`` timed runs in a row, once per round, ``rounds`` rounds, median.
    ``archs``: architectures to time in addition (e.g. ``["fbnet_b", "fbnet_c"]``).
    Returns ``{"mape": %, "spearman": rho, "repeatability": {"mape", "spearman"} (round
    against round, ``repeatability``), "rows": [{"arch", "predicted_ms", "measured_ms",
    "spread", "error_pct"}], ...}``.
    """
    return validate_many([table], samples, seed, space, device, batch, threads, reps, warmup,
                         num_classes, progress, rounds, runtime, archs)[0]


def validate_many(tables, samples: int = 20, seed: int = VALIDATE_SEED,
                  space: SearchSpace | None = None, device: str | None = None,
                  batch: int | None = None, threads: int | None = None, reps: int = 20,
                  warmup: int = 10, num_classes: int | None = None,
                  progress: bool = True, rounds: int = 2, runtime: str | None = None,
                  archs=None) -> list:
    """``validate`` for several tables against ONE measurement of the same networks.

    The fair way to compare measuring methods on a noisy machine: every table is scored
    against identical measured values. The tables must agree on the settings that change
    latency (space, device, batch, threads, memory format, runtime; ``runtime=`` times
    the networks in another runtime than the tables'); the calibration networks of every
    table are excluded.
    """
    first = tables[0]
    space = space or first.space
    if space is None:
        raise ValueError("the table records no search space; pass space=...")
    nc = num_classes or first.num_classes or 1000
    settings = [_settings(t) for t in tables]
    for t, st in zip(tables[1:], settings[1:]):
        if st != settings[0]:
            raise ValueError(f"tables measured with different settings cannot share one "
                             f"validation: {settings[0]} vs {st}")
    for t in tables:
        t.check(space, nc)
    dev_type, t_batch, t_threads, fmt, t_runtime = settings[0]
    dev, batch = device or dev_type, batch or t_batch
    threads = threads or t_threads
    runtime = runtime or t_runtime
    exclude = [n for t in tables for n in (t.calibration or {}).get("networks", [])]
    archs = [resolve_arch(a) for a in archs or []]
    for a in archs:
        if a.space != space:
            raise ValueError(f"architecture {a.name or list(a.blocks)} is not of the tables' "
                             "search space")
    archs += sample_architectures(space, samples, seed, exclude=exclude)
    runs = measure_networks(archs, device=dev, batch=batch, threads=threads, reps=reps,
                            warmup=warmup, rounds=rounds, num_classes=nc, memory_format=fmt,
                            progress=progress, runtime=runtime, raw=True)
    meas = [stats(s) for s in runs]
    med = [m.median for m in meas]
    again = repeatability(runs, reps)
    out = []
    for t in tables:
        pred = [t.latency(a, nc) for a in archs]
        rows = [{"arch": list(a.blocks), "name": a.name, "predicted_ms": p,
                 "measured_ms": m.median, "spread": m.spread, "ci": m.ci,
                 "error_pct": (p - m.median) / m.median * 100}
                for a, p, m in zip(archs, pred, meas)]
        out.append({"mape": mape(pred, med), "spearman": spearman(pred, med),
                    "bias_pct": float(np.mean([r["error_pct"] for r in rows])),
                    "samples": samples, "seed": seed, "device": dev, "batch": batch,
                    "threads": threads, "reps": reps, "warmup": warmup, "rounds": rounds,
                    "runtime": runtime, "method": t.meta.get("method"),
                    "repeatability": again, "rows": rows})
    return out


def repeatability(runs, reps: int) -> dict | None:
    """How far one measurement of the networks is from another: MAPE and Spearman of
    each later round's medians against the first round's (averaged over the rounds).

    No table can be expected to predict a measurement more closely than the next
    measurement of the same networks does, so this is the floor to read a table's MAPE
    against. ``runs``: each network's run times, ``reps`` per round; None for one round.
    """
    rounds = min(len(r) for r in runs) // reps
    if rounds < 2:
        return None
    med = [[float(np.median(r[k * reps:(k + 1) * reps])) for r in runs] for k in range(rounds)]
    return {"rounds": rounds,
            "mape": float(np.mean([mape(m, med[0]) for m in med[1:]])),
            "spearman": float(np.mean([spearman(m, med[0]) for m in med[1:]]))}


def _settings(t: LatencyTable) -> tuple:
    d = t.meta.get("device")
    dev = d.get("type", "cpu") if isinstance(d, dict) else "cpu"
    return (dev, int(t.meta.get("batch") or 1), t.meta.get("threads"),
            t.meta.get("memory_format", "contiguous"), table_runtime(t.meta))
