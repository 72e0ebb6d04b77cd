"""Latency tables: expected latency, file formats, errors, a small real measurement."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fbnet_fast.cli import main
from fbnet_fast.latency.formats import SCHEMA
from fbnet_fast.latency.keys import block_key, head_key, layer_keys, required_keys, stem_key
from fbnet_fast.latency.measuring import FIT_TIMING, measure, order_violations
from fbnet_fast.latency.table import LatencyTable
from fbnet_fast.latency.validation import mape, spearman, validate, validate_many
from fbnet_fast.nn.architecture import Architecture, sample_architectures
from fbnet_fast.nn.space import SearchSpace

SMALL = SearchSpace(resolution=32, width=0.25)
# The smallest space a real measurement needs: 4 layers, two of them sharing one shape (so
# their entries pool samples), candidates that can break both orderings (e1 < e3, k3 < k5).
TINY = SearchSpace(resolution=16, stem_channels=8, head_channels=32,
                   stages=((8, 1, 1), (16, 3, 2)), candidates=("k3_e1", "k3_e3", "k5_e1", "skip"))


def random_table(space=SMALL, seed=0, num_classes=1000) -> LatencyTable:
    """Every op of ``space`` with a random positive latency (ms)."""
    g = np.random.default_rng(seed)
    entries = {k: {"median": float(g.uniform(0.05, 2.0)), "mean": float(g.uniform(0.05, 2)),
                   "spread": float(g.uniform(0, 0.2)), "count": 7}
               for k in required_keys(space, num_classes)}
    meta = {"device": {"type": "cpu", "name": "test"}, "batch": 1, "threads": 1,
            "method": "context"}
    return LatencyTable(entries, meta, space.to_dict(), num_classes)


def brute_force(table, space, masks2d) -> float:
    total = table.value(stem_key(space)) + table.value(head_key(space, 1000))
    for l, layer in enumerate(space.layers()):
        for i, c in enumerate(space.candidates):
            k = block_key(c, layer.in_channels, layer.out_channels, layer.stride, layer.in_size)
            total += float(masks2d[l, i]) * table.value(k)
    return total


# --- expected latency ---------------------------------------------------------------

def test_expected_matches_brute_force_per_batch_and_per_example():
    table = random_table()
    L, K = SMALL.num_layers, SMALL.num_candidates
    g = torch.Generator().manual_seed(1)
    m = torch.softmax(torch.randn(L, K, generator=g, dtype=torch.float64), -1)
    got = table.expected(m)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(brute_force(table, SMALL, m), rel=1e-12)
    m3 = torch.softmax(torch.randn(L, 5, K, generator=g, dtype=torch.float64), -1)
    assert table.expected(m3).item() == pytest.approx(
        brute_force(table, SMALL, m3.mean(1)), rel=1e-12)
    # layer_matrix + fixed_ms is the same model, for the search loop
    mat = table.layer_matrix(SMALL, dtype=torch.float64)
    assert mat.shape == (L, K)
    assert ((m * mat).sum() + table.fixed_ms()).item() == pytest.approx(got.item(), rel=1e-12)


def test_expected_gradient_wrt_theta_gradcheck():
    table = random_table(seed=3)
    L, K = SMALL.num_layers, SMALL.num_candidates
    theta = torch.randn(L, K, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: table.expected(torch.softmax(t, -1)), (theta,))
    theta3 = torch.randn(L, 3, K, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: table.expected(torch.softmax(t, -1)), (theta3,),
                                    fast_mode=True)
    # d/dm of the expected latency is the table itself
    m = torch.rand(L, K, dtype=torch.float64, requires_grad=True)
    table.expected(m).backward()
    assert torch.allclose(m.grad, table.layer_matrix(dtype=torch.float64))


def test_one_hot_mask_gives_architecture_latency():
    table = random_table(seed=5)
    arch = sample_architectures(SMALL, 1, seed=11)[0]
    idx = [SMALL.candidates.index(b) for b in arch.blocks]
    onehot = torch.nn.functional.one_hot(torch.tensor(idx), SMALL.num_candidates).double()
    lat = table.latency(arch)
    assert table.expected(onehot).item() == pytest.approx(lat, rel=1e-12)
    assert lat == pytest.approx(brute_force(table, SMALL, onehot), rel=1e-12)
    # every form create_model accepts
    assert table.latency(arch.to_string()) == pytest.approx(lat)
    assert table.latency(arch.to_dict()) == pytest.approx(lat)


def test_expected_rejects_wrong_mask_shape():
    with pytest.raises(ValueError, match=r"masks must be Tensor\[22, 9\]"):
        random_table().expected(torch.rand(21, 9))


def test_calibration_scales_entries():
    table = random_table(seed=2)
    arch = sample_architectures(SMALL, 1, seed=4)[0]
    raw = table.latency(arch)
    table.calibration = {"scale": 1.25}
    assert table.latency(arch) == pytest.approx(1.25 * raw)
    k = next(iter(table.entries))
    assert table.value(k) == pytest.approx(1.25 * table.entries[k].median)


# --- files ---------------------------------------------------------------------------

def test_json_round_trip(tmp_path):
    table = random_table(seed=7)
    table.calibration = {"scale": 1.1, "networks": [["skip"] * 22]}
    table.entries[next(iter(table.entries))].flags.append("noisy: spread 30% > 15%")
    table.save(tmp_path / "t.json")
    back = LatencyTable.load(tmp_path / "t.json")
    assert back.entries == table.entries
    assert back.meta == table.meta and back.space == SMALL and back.num_classes == 1000
    assert back.calibration == table.calibration
    assert json.loads((tmp_path / "t.json").read_text())["schema"] == SCHEMA


def test_csv_round_trip_and_units(tmp_path):
    table = random_table(seed=8)
    table.save(tmp_path / "t.csv")
    back = LatencyTable.load(tmp_path / "t.csv")
    assert back.space == SMALL and back.num_classes == 1000
    for k, e in table.entries.items():
        assert back.value(k) == e.median            # repr() round-trips floats exactly
        assert back.entries[k].spread == e.spread and back.entries[k].count == 7
    # a table measured elsewhere, in microseconds, without metadata
    keys = required_keys(SMALL)
    lines = ["op,latency_us"] + [f"{k},{100 + i}" for i, k in enumerate(keys)]
    (tmp_path / "phone.csv").write_text("\n".join(lines) + "\n")
    phone = LatencyTable.load(tmp_path / "phone.csv")
    assert phone.value(keys[3]) == pytest.approx(0.103)
    assert phone.covers(SMALL) and phone.meta["source_unit"] == "us"
    with pytest.raises(ValueError, match="records no search space"):
        phone.expected(torch.rand(22, 9))


def test_missing_entry_is_named(tmp_path):
    table = random_table()
    gone = layer_keys(SMALL)[6][6]
    del table.entries[gone]
    assert not table.covers(SMALL)
    # the message names every layer of that shape: 7, 8 and 9 of this space
    assert gone == "k5_e3:i8:o8:s1:h4"
    assert [l.index + 1 for l in SMALL.layers() if (l.in_channels, l.out_channels, l.stride,
                                                    l.in_size) == (8, 8, 1, 4)] == [7, 8, 9]
    for call in (lambda: table.check(), lambda: table.layer_matrix(),
                 lambda: table.expected(torch.rand(22, 9)),
                 lambda: table.latency(Architecture(["k5_e3"] * 22, SMALL))):
        with pytest.raises(ValueError, match=rf"no entry '{gone}' \(needed by searchable "
                                             r"layer\(s\) 7, 8, 9\); measure it"):
            call()
    # a table for another resolution does not cover this space
    with pytest.raises(ValueError, match="no entry 'stem:i3:o8:s2:h64'"):
        random_table().check(SMALL.replace(resolution=64))


@pytest.mark.parametrize("bad, match", [
    ({"schema": "fbnet_fast.lut/0"}, "unsupported schema 'fbnet_fast.lut/0'"),
    ({"unit": "minutes"}, "field 'unit'"),
    ({"entries": {}}, "field 'entries'"),
])
def test_bad_json_fields(tmp_path, bad, match):
    d = random_table().to_dict()
    d.update(bad)
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match):
        LatencyTable.load(tmp_path / "t.json")


@pytest.mark.parametrize("value, match", [(-0.5, "negative"), (float("nan"), "finite"),
                                          (float("inf"), "finite"), ("fast", "number")])
def test_bad_latency_values_are_named(tmp_path, value, match):
    d = random_table().to_dict()
    key = layer_keys(SMALL)[2][3]
    d["entries"][key]["median"] = value
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=rf"entry '{key}' field 'median'.*{match}"):
        LatencyTable.load(tmp_path / "t.json")
    lines = ["op,latency_ms", f"{stem_key(SMALL)},0.5", f"{key},{value}"]
    (tmp_path / "t.csv").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=rf"row 2: latency of op '{key}'.*{match}"):
        LatencyTable.load(tmp_path / "t.csv")


@pytest.mark.parametrize("text, match", [
    ("op,latency\nstem:i3:o8:s2:h32,1\n", "latency_ms, latency_us or latency_s"),
    ("key,latency_ms\nstem:i3:o8:s2:h32,1\n", "must start with 'op'"),
    ("op,latency_ms\nk4_e6:16:24,1\n", "malformed op key 'k4_e6:16:24'"),
    ("op,latency_ms\nstem:i3:o8:s2:h32,1\nstem:i3:o8:s2:h32,2\n", "appears twice"),
    ("op,latency_ms\n", "no op rows"),
])
def test_bad_csv(tmp_path, text, match):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(ValueError, match=match):
        LatencyTable.load(tmp_path / "t.csv")


# --- ordering checks, statistics ---------------------------------------------------------

def test_order_violations():
    shape = ":i16:o16:s1:h8"
    v = {"k3_e1" + shape: 1.0, "k3_e3" + shape: 2.0, "k3_e6" + shape: 1.5,
         "k5_e1" + shape: 1.1, "k5_e3" + shape: 1.9, "k5_e6" + shape: 4.0}
    got = {(a.split(":")[0], b.split(":")[0]) for a, b, _ in order_violations(v)}
    # k3_e6 faster than k3_e3, and k5_e3 faster than k3_e3
    assert got == {("k3_e3", "k3_e6"), ("k3_e3", "k5_e3")}
    assert order_violations(v, tol=0.3) == []


def test_spearman_and_mape():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks x = 1, 2.5, 2.5, 4; y = 1, 2, 3, 4
    assert spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    x = np.random.default_rng(0).normal(size=30)
    y = x ** 3 + 0.1 * np.random.default_rng(1).normal(size=30)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert mape([11, 18], [10, 20]) == pytest.approx(10.0)


def test_sample_architectures_seeded_distinct_and_excluding():
    a = sample_architectures(SMALL, 6, seed=3)
    assert [x.blocks for x in a] == [x.blocks for x in sample_architectures(SMALL, 6, seed=3)]
    assert len({x.blocks for x in a}) == 6
    b = sample_architectures(SMALL, 6, seed=3, exclude=[a[0].blocks])
    assert a[0].blocks not in {x.blocks for x in b}


# --- a real (tiny) measurement -------------------------------------------------------------

@pytest.mark.parametrize("method", ["naive", "context"])
def test_small_measured_table_is_positive_and_finite(method, tmp_path):
    threads = torch.get_num_threads()
    table = measure(TINY, method=method, reps=3, warmup=1, threads=1, retries=1,
                    num_classes=10, progress=False)
    assert torch.get_num_threads() == threads      # restored
    assert table.covers(TINY) and set(table.entries) == set(required_keys(TINY, 10))
    # samples per entry: reps (naive); in context, reps times the runs per round: once per
    # layer of that shape for a block, every one of the K = 4 passes for stem and head.
    # Doubled if re-measured for breaking an ordering (samples pooled).
    runs = {k: sum(row.count(k) for row in layer_keys(TINY)) or 4 for k in table.entries}
    for k, e in table.entries.items():
        assert math.isfinite(e.median) and e.median > 0, k
        n = 3 * (runs[k] if method == "context" else 1)
        assert e.count in (n, 2 * n) and e.spread >= 0, k
    m = table.meta
    assert (m["method"], m["batch"], m["threads"], m["dtype"]) == (method, 1, 1, "float32")
    assert (m["reps"], m["warmup"]) == (3, 1)
    assert m["torch"] == torch.__version__ and m["device"]["type"] == "cpu"
    if method == "context":
        # every pass is a whole network: K = 4 per round, 3 rounds, again per re-measurement
        again = sum(w.startswith("re-measured") for w in table.warnings)
        assert m["pass_ratio"]["passes"] == 4 * 3 * (1 + again)
        assert m["pass_ratio"]["median"] > 0
    table.save(tmp_path / "m.json")
    assert LatencyTable.load(tmp_path / "m.json").entries == table.entries


def test_calibrated_measure_records_networks():
    table = measure(TINY, method="calibrated", reps=3, warmup=1, threads=1, retries=0,
                    calib_samples=2, num_classes=10, progress=False)
    cal = table.calibration
    assert cal["scale"] > 0 and len(cal["networks"]) == 2
    ratios = sorted(m / p for m, p in zip(cal["measured_ms"], cal["predicted_ms"]))
    assert cal["scale"] == pytest.approx(sum(ratios) / 2)       # median of two
    reps, _, rounds = FIT_TIMING["scale"]                       # benchmark-style
    assert cal["runs"] == [reps * rounds] * 2
    assert cal["fitted_ms"] == pytest.approx([cal["scale"] * p for p in cal["predicted_ms"]])
    rep = validate(table, samples=3, reps=3, warmup=1, rounds=1, progress=False)
    assert len(rep["rows"]) == 3
    held_out = {tuple(n) for n in cal["networks"]}
    assert not held_out & {tuple(r["arch"]) for r in rep["rows"]}
    for r in rep["rows"]:
        assert r["predicted_ms"] == pytest.approx(table.latency(Architecture(r["arch"], TINY)))
    # the scores are those of the report's own rows, re-scored by hand
    pred = np.array([r["predicted_ms"] for r in rep["rows"]])
    meas = np.array([r["measured_ms"] for r in rep["rows"]])
    err = (pred - meas) / meas * 100
    assert [r["error_pct"] for r in rep["rows"]] == pytest.approx(err)
    assert rep["mape"] == pytest.approx(np.abs(err).mean())
    assert rep["bias_pct"] == pytest.approx(err.mean())
    rp, rm = np.argsort(np.argsort(pred)), np.argsort(np.argsort(meas))   # timings never tie
    assert rep["spearman"] == pytest.approx(np.corrcoef(rp, rm)[0, 1])
    # several tables scored against one measurement of the same networks
    other = LatencyTable.from_dict(table.to_dict())
    other.calibration = None
    both = validate_many([table, other], samples=3, reps=3, warmup=1, rounds=1, progress=False)
    meas = [r["measured_ms"] for r in both[0]["rows"]]
    assert meas == [r["measured_ms"] for r in both[1]["rows"]]
    for r0, r1 in zip(both[0]["rows"], both[1]["rows"]):
        assert r0["predicted_ms"] == pytest.approx(cal["scale"] * r1["predicted_ms"])


def test_ci_target_and_fitted_method(tmp_path):
    """Entries re-measured towards a confidence target, each reporting its interval; the
    fitted correction recorded, used and kept in the file."""
    table = measure(TINY, method="fitted", reps=3, warmup=1, threads=1, ci=0.5,
                    max_rounds=2, calib_samples=5, num_classes=10, progress=False)
    assert table.meta["ci_target"] == 0.5
    for k, e in table.entries.items():
        assert e.ci is not None and e.ci >= 0 and e.count >= 3, k
        assert (e.ci > 0.5) == any(f.startswith("noisy: ci") for f in e.flags), k
    cal = table.calibration       # per type, or one scale when timings cannot tell them apart
    assert len(cal["networks"]) == 5 and "least squares" in cal["fit"]
    assert all(s > 0 for s in cal.get("type_scales", {"all": cal["scale"]}).values())
    assert cal["fitted_ms"] == pytest.approx(
        [table.latency(Architecture(n, TINY)) for n in cal["networks"]])
    table.save(tmp_path / "f.json")
    back = LatencyTable.load(tmp_path / "f.json")
    assert back.entries == table.entries and back.calibration == cal
    with pytest.raises(ValueError, match="needs calib_samples >= 5"):
        measure(TINY, method="fitted", calib_samples=4, progress=False)


# --- CLI ------------------------------------------------------------------------------

def test_cli_template_import_show(tmp_path, capsys):
    tpl = tmp_path / "ops.csv"
    assert main(["lut", "template", "--resolution", "32", "--width", "0.25", "--unit", "us",
                 "--out", str(tpl)]) == 0
    lines = tpl.read_text().splitlines()
    filled = [l + "250" if l.endswith(",") else l for l in lines]
    tpl.write_text("\n".join(filled[:-3]) + "\n")            # drop two ops and the head
    assert main(["lut", "import", str(tpl), "--out", str(tmp_path / "x.json")]) == 2
    assert "no entry" in capsys.readouterr().err
    tpl.write_text("\n".join(filled) + "\n")
    assert main(["lut", "import", str(tpl), "--out", str(tmp_path / "x.json")]) == 0
    table = LatencyTable.load(tmp_path / "x.json")
    assert table.value(stem_key(SMALL)) == pytest.approx(0.25)
    assert table.latency(Architecture(["k3_e6"] * 22, SMALL)) == pytest.approx(24 * 0.25)
    table.entries[layer_keys(SMALL)[0][0]].flags.append("noisy: spread 40% > 15%")
    table.save(tmp_path / "x.json")
    capsys.readouterr()
    assert main(["lut", "show", str(tmp_path / "x.json")]) == 0
    out = capsys.readouterr().out
    assert "tbs22" in out and "0.250~" in out and "stem" in out
