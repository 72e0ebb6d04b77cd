"""The timing protocol and the whole-network fits, with a fake clock: no timed assertions.

benchmark-style timing (rounds, warm-up, runs in a row, median), the confidence interval
of a median, the least-squares correction recovering known costs from synthetic
whole-network sums, a fitted table in use and in its file, the runtime recorded.
"""
from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from fbnet_fast.latency import measuring
from fbnet_fast.latency.keys import layer_keys
from fbnet_fast.latency.measuring import (calibrate, fit_lstsq, fit_ridge, measure_networks,
                                          median_ci, order_violations, stats)
from fbnet_fast.latency.runtimes import table_runtime
from fbnet_fast.latency.table import LatencyTable
from fbnet_fast.latency.timing import benchmark, steady_heap
from fbnet_fast.latency.validation import repeatability, validate
from fbnet_fast.nn.architecture import sample_architectures
from test_latency import SMALL, TINY, random_table


class FakeClock:
    """A clock that moves only when a fake run says how long it took (seconds)."""

    def __init__(self):
        self.t, self.log = 100.0, []

    def __call__(self):
        return self.t

    def run(self, name, durations):
        it = iter(durations)

        def go():
            self.log.append(name)
            self.t += next(it)
        return go


def test_benchmark_rounds_warmup_runs_in_a_row_and_median():
    clock = FakeClock()
    # A: 2 warm-ups (slow, untimed), then 3 timed runs, per round; B the same
    a = clock.run("A", [9, 9, 0.001, 0.003, 0.002, 9, 9, 0.004, 0.005, 0.006])
    b = clock.run("B", [7, 7, 0.010, 0.030, 0.020, 7, 7, 0.040, 0.050, 0.060])
    got = benchmark([a, b], reps=3, warmup=2, rounds=2, clock=clock)
    # one network at a time, its runs in a row; whole rounds interleaved
    assert clock.log == ["A"] * 5 + ["B"] * 5 + ["A"] * 5 + ["B"] * 5
    assert got[0] == pytest.approx([1, 3, 2, 4, 5, 6])          # ms, warm-ups left out
    assert got[1] == pytest.approx([10, 30, 20, 40, 50, 60])
    assert stats(got[0]).median == pytest.approx(3.5)
    assert stats(got[1]).count == 6
    with pytest.raises(ValueError, match="reps >= 1"):
        benchmark([a], reps=0, warmup=1)


def test_median_confidence_interval():
    # n = 100: ranks 40 and 61 (1-based) bound the median: (61 - 40) / 2 / 50.5
    assert median_ci(np.arange(1, 101)) == pytest.approx(10.5 / 50.5)
    assert stats(np.arange(1, 101)).ci == pytest.approx(10.5 / 50.5)
    # tighter samples, tighter interval; more samples of the same spread, tighter too
    g = np.random.default_rng(0)
    wide, narrow = 1 + 0.2 * g.random(50), 1 + 0.02 * g.random(50)
    assert median_ci(narrow) < median_ci(wide) / 5
    assert median_ci(1 + 0.2 * g.random(800)) < median_ci(wide) / 2


def test_order_flags_need_more_than_the_confidence_intervals():
    shape = ":i16:o16:s1:h8"
    v = {"k3_e1" + shape: 1.0, "k3_e3" + shape: 0.9}              # e3 10 % faster than e1
    assert len(order_violations(v, 0.03)) == 1
    ci = {"k3_e1" + shape: 0.04, "k3_e3" + shape: 0.04}          # within 3 % + 4 % + 4 %
    assert order_violations(v, 0.03, ci) == []
    assert len(order_violations(v, 0.03, {k: 0.02 for k in v})) == 1


def test_fit_lstsq_recovers_offset_and_per_type_scales():
    g = np.random.default_rng(1)
    names = ["a", "b", "c", "never"]
    feats = np.hstack([g.uniform(1, 5, (12, 3)), np.zeros((12, 1))])
    true_scales, offset = np.array([0.8, 1.3, 2.0]), 0.7
    measured = offset + feats[:, :3] @ true_scales
    got_offset, scales = fit_lstsq(feats, measured, names)
    assert got_offset == pytest.approx(offset)
    assert [scales[n] for n in "abc"] == pytest.approx(true_scales)
    assert scales["never"] == 1.0
    # too few networks to tell the types apart (2 networks, 4 numbers), or a type whose
    # scale would come out negative: one common scale, exact where the data allow it
    off, one = fit_lstsq(feats[:2], measured[:2], names)
    assert len({one[n] for n in "abc"}) == 1 and one["a"] > 0
    assert off + feats[:2, :3].sum(1) * one["a"] == pytest.approx(measured[:2])
    off, one = fit_lstsq(feats, offset + feats[:, :3] @ [1.0, 1.0, -0.5], names)
    assert len({one[n] for n in "abc"}) == 1 and one["a"] > 0


def fake_networks(truth):
    """A ``measure_networks`` whose networks take exactly ``truth(arch)`` ms."""
    calls = []

    def fake(archs, **kw):
        calls.append(kw)
        return [stats([truth(a)] * 3) for a in archs]
    return fake, calls


def test_fitted_table_recovers_known_costs_from_whole_networks(monkeypatch, tmp_path):
    """Whole networks that cost 0.5 ms + per-type multiples of the table's entries: the
    fit finds exactly those, and the table then predicts every network exactly."""
    table = random_table(SMALL, seed=4)
    true = {c: 0.6 + 0.1 * i for i, c in enumerate(SMALL.candidates)}
    rows, fixed = layer_keys(SMALL), table.fixed_ms(SMALL)

    def truth(arch):
        blocks = sum(true[n] * table.entries[row[SMALL.candidates.index(n)]].median
                     for n, row in zip(arch.blocks, rows))
        return 0.5 + fixed + blocks

    fake, calls = fake_networks(truth)
    monkeypatch.setattr(measuring, "measure_networks", fake)
    calibrate(table, samples=30, fit="lstsq", progress=False)
    cal = table.calibration
    assert cal["offset_ms"] == pytest.approx(0.5)
    assert cal["type_scales"] == pytest.approx(true)
    assert calls[0]["runtime"] == "torch"                      # the table's runtime
    assert (calls[0]["reps"], calls[0]["warmup"], calls[0]["rounds"]) == \
        measuring.FIT_TIMING["lstsq"]
    for a in sample_architectures(SMALL, 5, seed=99):
        assert table.latency(a) == pytest.approx(truth(a))
    # the search's expected latency is the same fitted model, still linear in the masks
    idx = torch.tensor([SMALL.candidates.index(n) for n in a.blocks])
    onehot = torch.nn.functional.one_hot(idx, SMALL.num_candidates).double()
    assert table.expected(onehot).item() == pytest.approx(truth(a))
    # the file keeps the fit
    table.save(tmp_path / "fitted.json")
    back = LatencyTable.load(tmp_path / "fitted.json")
    assert back.latency(a) == pytest.approx(truth(a))
    assert back.calibration["type_scales"] == pytest.approx(true)


def test_regressed_table_recovers_per_entry_costs_from_whole_networks(monkeypatch, tmp_path):
    """Whole networks whose blocks cost their entry plus a known per-entry extra (up to
    ±10 % of it), and 0.4 ms once: fitted to 200 such networks, the table's error on new
    networks falls to a fraction of the uncorrected table's (the prior keeps a little of
    it: it draws every correction towards 0), its corrections follow the true extras,
    and the file keeps them."""
    table = random_table(SMALL, seed=5)
    rows = layer_keys(SMALL)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    g = np.random.default_rng(1)
    extra = {k: float(table.entries[k].median * g.uniform(-0.1, 0.1)) for k in keys}
    raw = LatencyTable.from_dict(table.to_dict())          # stays uncorrected

    def truth(arch):
        return 0.4 + raw.latency(arch) + sum(
            extra[row[SMALL.candidates.index(n)]] for n, row in zip(arch.blocks, rows))

    fake, calls = fake_networks(truth)
    monkeypatch.setattr(measuring, "measure_networks", fake)
    new = sample_architectures(SMALL, 20, seed=99)
    before = np.array([table.latency(a) / truth(a) - 1 for a in new])
    calibrate(table, samples=200, fit="ridge", progress=False)
    cal = table.calibration
    assert (calls[0]["reps"], calls[0]["warmup"], calls[0]["rounds"]) == \
        measuring.FIT_TIMING["ridge"]
    after = np.array([table.latency(a) / truth(a) - 1 for a in new])
    assert np.abs(after).mean() < np.abs(before).mean() / 10
    assert np.abs(after).max() < 0.005
    assert "ridge" in cal["fit"] and cal["offset_ms"] == pytest.approx(0.4, abs=0.1)
    fitted = [cal["entry_ms"].get(k, 0.0) for k in keys]
    assert np.corrcoef(fitted, [extra[k] for k in keys])[0, 1] > 0.9
    assert all(table.value(k) >= 0 for k in keys)
    table.save(tmp_path / "regressed.json")
    back = LatencyTable.load(tmp_path / "regressed.json")
    assert [back.latency(a) for a in new] == pytest.approx([table.latency(a) for a in new])


def test_ridge_prior_is_chosen_by_cross_validation():
    """Networks of 10 layers with 4 entries each: when the entries really are off by up
    to 40 %, cross-validation picks a wide prior and recovers the offsets; when the
    networks differ from the table only by noise, it picks the narrowest and corrects
    next to nothing."""
    g = np.random.default_rng(3)
    layers, per = 10, 4
    base = g.uniform(0.1, 1.0, layers * per)
    pick = g.integers(0, per, (200, layers)) + np.arange(layers) * per
    x = np.zeros((200, layers * per))
    np.put_along_axis(x, pick, 1.0, axis=1)
    y0 = x @ base + 1.0
    wrong = base * g.uniform(-0.4, 0.4, base.size)
    noise = y0 * 0.005 * g.standard_normal(200)
    offset, d, prior = fit_ridge(x, 0.2 + x @ wrong + noise, base, y0 + 0.2 + x @ wrong)
    assert prior >= 0.25 and offset == pytest.approx(0.2, abs=0.1)
    assert np.corrcoef(d, wrong)[0, 1] > 0.9
    offset, d, prior = fit_ridge(x, noise, base, y0)
    assert prior == measuring.RIDGE_PRIORS[0]
    assert (np.abs(d) / base).max() < 0.03


def test_a_malformed_correction_in_the_file_is_named(tmp_path):
    table = random_table(SMALL, seed=5)
    table.calibration = {"scale": 1.0, "offset_ms": 0.1, "entry_ms": {"k3_e1:i8": 0.1}}
    with pytest.raises(ValueError, match="k3_e1:i8"):
        LatencyTable.from_dict(table.to_dict())
    key = layer_keys(SMALL)[0][0]
    table.calibration["entry_ms"] = {key: float("nan")}
    with pytest.raises(ValueError, match=f"calibration.entry_ms.{key}"):
        LatencyTable.from_dict(table.to_dict())


def test_scale_calibration_is_the_median_ratio(monkeypatch):
    table = random_table(SMALL, seed=6)
    factors = iter([1.1, 1.3, 1.2, 5.0, 1.25])
    fake, _ = fake_networks(lambda a: next(factors) * table.latency(a))
    monkeypatch.setattr(measuring, "measure_networks", fake)
    calibrate(table, samples=5, progress=False)
    assert table.calibration["scale"] == pytest.approx(1.25)
    assert "type_scales" not in table.calibration


def test_validate_times_networks_benchmark_style(monkeypatch):
    """validate hands its networks to ``timing.benchmark`` with its reps, warm-up and
    rounds; with a fake clock every network takes a known time, so the scores are exact."""
    table = random_table(TINY, seed=2, num_classes=10)
    seen = {}
    real = measuring.benchmark

    def fake_benchmark(runs, reps, warmup, rounds=1, on_round=None, lazy=False):
        clock = FakeClock()
        seen.update(n=len(runs), reps=reps, warmup=warmup, rounds=rounds, lazy=lazy)
        timed = [clock.run(i, [0.001 * (i + 1)] * (warmup + reps) * rounds)
                 for i in range(len(runs))]
        built = []

        def factory(i):
            return lambda: (built.append(i), timed[i])[1]
        out = real([factory(i) for i in range(len(runs))], reps, warmup, rounds, clock=clock,
                   on_round=on_round, lazy=True)
        n = warmup + reps
        assert clock.log == [i for _ in range(rounds) for i in range(len(runs))
                             for _ in range(n)]
        # each network is built at its turn of every round, never all at once
        assert built == [i for _ in range(rounds) for i in range(len(runs))]
        return out

    monkeypatch.setattr(measuring, "benchmark", fake_benchmark)
    rep = validate(table, samples=4, reps=5, warmup=2, rounds=3, progress=False)
    assert seen == {"n": 4, "reps": 5, "warmup": 2, "rounds": 3, "lazy": True}
    assert [r["measured_ms"] for r in rep["rows"]] == pytest.approx([1, 2, 3, 4])
    pred = np.array([r["predicted_ms"] for r in rep["rows"]])
    assert rep["mape"] == pytest.approx(np.mean(np.abs(pred - [1, 2, 3, 4]) / [1, 2, 3, 4]) * 100)
    assert rep["runtime"] == "torch" and rep["rounds"] == 3
    # every round measured the same times: the networks repeat exactly
    assert rep["repeatability"] == {"rounds": 3, "mape": 0.0, "spearman": pytest.approx(1.0)}


def test_repeatability_compares_later_rounds_with_the_first():
    """Round 2 runs every network 10 % slower, round 3 reverses their order: the floor
    is the mean of the two rounds' MAPE and Spearman against round 1."""
    first = np.array([1.0, 2.0, 3.0, 4.0])
    rounds = [first, first * 1.1, first[::-1].copy()]
    around = np.array([0.01, -0.005, 0.0, 0.005, -0.01])   # 5 runs per round, median m
    runs = [np.concatenate([m[n] + around for m in rounds]) for n in range(4)]
    again = repeatability(runs, reps=5)
    third = np.mean(np.abs(first[::-1] - first) / first) * 100
    assert again["rounds"] == 3
    assert again["mape"] == pytest.approx((10 + third) / 2)
    assert again["spearman"] == pytest.approx((1 - 1) / 2)
    assert repeatability(runs, reps=15) is None          # one round: nothing to compare


FAULTS = """
import resource, torch

def passes(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(2 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

passes(3)
default = passes(40)
from fbnet_fast.latency.timing import heap_is_steady, steady_heap   # moves the thresholds
from fbnet_fast.latency.measuring import measure
from fbnet_fast.nn.space import SearchSpace
tiny = SearchSpace(resolution=16, stem_channels=8, head_channels=32, stages=((8, 1, 1),),
                   candidates=("k3_e1", "skip"))
table = measure(tiny, method="naive", reps=3, warmup=1, threads=1, retries=0,
                num_classes=10, progress=False, steady=False)   # as the search measures
left = (table.meta["heap"], heap_is_steady())
pinned = steady_heap()
passes(3)
print(default, pinned, passes(40), *left)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_steady_heap_stops_the_page_faults_of_freed_activations():
    """An 8 MB activation allocated, written and freed 40 times in a fresh process, first
    with glibc's default heap, then pinned: the default maps and faults the block's 2,048
    pages in again on some passes (4,000-14,000 faults here); pinned, its pages stay in
    the process. A table measured with ``steady=False`` (the search's) leaves the heap
    as it was and says so."""
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True,
                         check=True).stdout.split()
    default, pinned, after = int(out[0]), out[1], int(out[2])
    assert out[3:] == ["default", "False"]   # measure(steady=False) left the heap alone
    assert pinned == "True"
    assert default >= 2048
    assert after < 2048


def test_measure_networks_rejects_runtime_settings_that_do_not_go_together():
    archs = sample_architectures(TINY, 1, seed=0)
    with pytest.raises(ValueError, match="runtime must be one of torch, onnxruntime"):
        measure_networks(archs, runtime="tflite", progress=False)
    with pytest.raises(ValueError, match="float32 NCHW"):
        measure_networks(archs, runtime="onnxruntime", memory_format="channels_last",
                         progress=False)


def test_runtime_of_old_and_new_tables():
    assert table_runtime({}) == "torch"
    assert table_runtime({"runtime": "pytorch 2.14.1 eager"}) == "torch"
    assert table_runtime({"runtime": "onnxruntime 1.32.0 CPUExecutionProvider"}) \
        == "onnxruntime"
    assert table_runtime({"runtime_name": "onnxruntime"}) == "onnxruntime"


def test_fit_that_would_predict_a_negative_latency_falls_back_to_one_scale(monkeypatch):
    """Networks whose fixed cost is negative enough that the fastest architecture would be
    predicted below zero: the loss takes log(latency), so the fit keeps one scale."""
    table = random_table(SMALL, seed=8)
    fastest = float(table.layer_matrix().min(1).values.sum()) + table.fixed_ms()
    fake, _ = fake_networks(lambda a: table.latency(a) - fastest - 0.1)
    monkeypatch.setattr(measuring, "measure_networks", fake)
    calibrate(table, samples=30, fit="lstsq", progress=False)
    cal = table.calibration
    assert "type_scales" not in cal and "one scale" in cal["fit"]
    assert cal["scale"] > 0 and float(table.layer_matrix().min(1).values.sum()) > 0
