"""``fbnet-fast baseline``: the search's architectures against random ones of its space, each
trained from scratch (tiny run, a few steps each)."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys

import pytest
import torch

from fbnet_fast.cli import main as cli_main
from fbnet_fast.latency.loss import FBNetLoss, objective
from fbnet_fast.latency.table import LatencyTable
from fbnet_fast.nn.architecture import Architecture, sample_architectures
from fbnet_fast.search import baseline as baseline_mod
from fbnet_fast.search.baseline import compare, run_baseline
from fbnet_fast.search.config import build_space
from fbnet_fast.search.evaluate import finetune
from fbnet_fast.search.loop import run_search

sys.path.insert(0, os.path.dirname(__file__))
from search_helpers import macs_table, one_line_error, tiny_config  # noqa: E402

# one search epoch of two weight and two θ batches: a finished run in about 2 s
RUN = dict(epochs=1, warmup_epochs=0, max_batches=2, finetune_steps=0, builtin_train=160,
           builtin_val=48)
NAMES = ["argmax", "sample_1", "sample_2", "random_1", "random_2", "random_3"]


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    lut = tmp_path_factory.mktemp("lut") / "lut.json"
    macs_table(tiny_config("unused")).save(lut)
    out = tmp_path_factory.mktemp("search") / "run"
    run_search(tiny_config(out, lut=str(lut), **RUN), quiet=True)
    return out


@pytest.fixture
def run_dir(search_run, tmp_path):
    """A private copy of the finished run (the baseline writes into it)."""
    out = tmp_path / "run"
    shutil.copytree(search_run, out)
    return out


def _counting(monkeypatch, fail_at=None):
    """Count the trainings run_baseline starts; raise KeyboardInterrupt at call ``fail_at``."""
    calls = []

    def wrapped(*a, **kw):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return finetune(*a, **kw)
    monkeypatch.setattr(baseline_mod, "finetune", wrapped)
    return calls


def test_rows_latency_summary_and_plot(run_dir, capsys):
    res = run_baseline(str(run_dir), random=3, epochs=1, quiet=True)
    cfg = json.loads((run_dir / "config.json").read_text())
    space = build_space(tiny_config(run_dir, **RUN))
    rows = res["rows"]
    assert [r["name"] for r in rows] == NAMES
    assert [r["source"] for r in rows] == ["search"] * 3 + ["random"] * 3
    # the searched rows are the run's architecture files, the random ones the seeded draw
    searched = [json.loads((run_dir / "archs" / f"{n}.json").read_text())["blocks"]
                for n in NAMES[:3]]
    assert [r["blocks"] for r in rows[:3]] == searched
    drawn = sample_architectures(space, 3, cfg["seed"], exclude=searched)
    assert [r["blocks"] for r in rows[3:]] == [list(a.blocks) for a in drawn]
    assert len({tuple(r["blocks"]) for r in rows}) == 6
    # latency: the run's own table
    table = LatencyTable.load(run_dir / "lut.json")
    for r in rows:
        assert r["latency_ms"] == round(table.latency(Architecture(r["blocks"], space), 10), 6)
        assert 0 <= r["val_acc"] <= 1 and 0 < r["val_ce"] < 10
    # the settings: 1 epoch of all 160 training images, capped by the run's max_batches
    st = res["settings"]
    assert (st["epochs"], st["seed"], st["random"]) == (1, 0, 3)
    assert (st["steps"], st["batch_size"], st["lr"], st["train_images"], st["val_images"]) \
        == (2, 16, cfg["w_lr"], 160, 48)
    # summary: the run's objective (its --latency-loss) and the counts, as compare() has them
    s = res["summary"]
    mode = cfg["latency_loss"]
    assert s["loss"] == mode
    assert s == compare(rows, mode, cfg["alpha"], cfg["beta"], cfg["lam"])
    a = rows[0]
    assert s["objective"]["argmax"] == round(
        objective(a["val_ce"], a["latency_ms"], mode, cfg["alpha"], cfg["beta"], cfg["lam"]), 6)
    assert s["random"] == 3 and 0 <= s["beats"] <= 3
    # the file holds what was returned; the plot is a PNG
    assert json.loads((run_dir / "baseline" / "baseline.json").read_text()) == res
    png = run_dir / "plots" / "baseline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "random_3" in out and f"beats {s['beats']} of 3 random" in out


def test_objective_is_the_search_loss():
    """``objective`` and ``FBNetLoss`` share the formula: a one-hot mask gives the same."""
    cfg = tiny_config("unused")
    space, table = build_space(cfg), macs_table(cfg)
    arch = Architecture(["k5_e6", "k3_e1", "skip", "k3_e3"], space)
    masks = torch.zeros(space.num_layers, space.num_candidates, dtype=torch.float64)
    for l, b in enumerate(arch.blocks):
        masks[l, space.candidates.index(b)] = 1
    torch.manual_seed(0)
    logits, y = torch.randn(8, 10, dtype=torch.float64), torch.randint(0, 10, (8,))
    ce = float(torch.nn.functional.cross_entropy(logits, y))
    lat = table.latency(arch, 10)
    for mode, kw in (("mult", dict(alpha=0.3, beta=0.7)), ("add", dict(lam=0.4)),
                     ("none", {})):
        crit = FBNetLoss(table, mode, **kw)
        assert objective(ce, lat, mode, **kw) == pytest.approx(float(crit(logits, y, masks)),
                                                               rel=1e-12)
    assert objective(2.0, 2.0, "mult", 0.2, 0.6) == pytest.approx(
        2.0 * 0.2 * math.log(2000.0) ** 0.6, rel=1e-15)
    assert objective(2.0, 3.0, "add", lam=0.5) == 3.5
    assert objective(2.0, 3.0, "none") == 2.0


def _row(name, acc, lat, ce, source="random"):
    return {"name": name, "source": source, "blocks": [], "latency_ms": lat, "val_acc": acc,
            "val_ce": ce}


HAND = [
    _row("argmax", 0.5, 2.0, 1.0, "search"),
    _row("sample_1", 0.9, 0.1, 0.1, "search"),   # better in every way, but not random
    _row("r1", 0.6, 2.0, 0.9),     # dominates: more accurate, as fast
    _row("r2", 0.5, 2.0, 1.0),     # identical: a tie on every objective, does not dominate
    _row("r3", 0.5, 1.5, 1.2),     # dominates: as accurate, faster
    _row("r4", 0.7, 3.0, 0.8),     # more accurate but slower: does not dominate
    _row("r5", 0.4, 0.5, 1.1),     # faster but less accurate
    _row("r6", 0.55, 1.9, 5.0),    # dominates (both strictly), terrible CE
    _row("r7", 0.1, 5.0, None),    # CE not finite: no objective, beaten on every one
]


@pytest.mark.parametrize("mode, kw, beats", [
    # CE: argmax 1.0 beats r3 1.2, r5 1.1, r6 5.0, r7; ties r2
    ("none", {}, 4),
    # CE + 0.5 LAT_ms: argmax 2.0; r1 1.9, r3 1.95, r5 1.35 beat it; r4 2.3, r6 5.95, r7 lose
    ("add", dict(lam=0.5), 3),
    # CE * 0.2 * (log LAT_us)^0.6: argmax 0.6754; r1 0.6078, r4 0.5574, r5 0.6584 beat it;
    # r3 0.7919, r6 3.38, r7 lose
    ("mult", dict(alpha=0.2, beta=0.6), 3),
])
def test_compare_counts_hand_made_rows(mode, kw, beats):
    s = compare(HAND, mode, **kw)
    assert s["loss"] == mode and s["reference"] == "argmax" and s["random"] == 7
    assert s["beats"] == beats and s["ties"] == 1
    assert s["dominated_by"] == 3 and s["dominators"] == ["r1", "r3", "r6"]
    assert s["objective"]["r7"] is None
    lam, alpha, beta = kw.get("lam", 0.01), kw.get("alpha", 0.2), kw.get("beta", 0.6)
    assert s["objective"]["argmax"] == round(
        {"none": 1.0, "add": 1.0 + lam * 2.0,
         "mult": 1.0 * alpha * math.log(2000.0) ** beta}[mode], 6)
    # sample_1 beats every random row with an objective, and nothing dominates it
    assert s["searched"]["sample_1"]["beats"] == 7
    assert s["searched"]["sample_1"]["dominated_by"] == 0
    assert s["searched"]["argmax"]["beats"] == beats
    assert s["random_val_acc_max"] == 0.7


def test_resume_skips_trained_rows_and_settings_must_match(run_dir, monkeypatch, capsys):
    calls = _counting(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_baseline(str(run_dir), random=3, epochs=1, quiet=True)
    assert len(calls) == 3
    path = run_dir / "baseline" / "baseline.json"
    first = json.loads(path.read_text())["rows"]
    assert [r["name"] for r in first] == NAMES[:2]          # written after each one
    calls = _counting(monkeypatch)
    res = run_baseline(str(run_dir), random=3, epochs=1, quiet=True)
    assert len(calls) == 4                                   # the 4 not in the file
    assert [r["name"] for r in res["rows"]] == NAMES and res["rows"][:2] == first
    calls = _counting(monkeypatch)
    again = run_baseline(str(run_dir), random=3, epochs=1, quiet=True)
    assert len(calls) == 0 and again == res
    # each architecture is trained alone from the same seed: resumed rows = a fresh run's
    fresh_dir = run_dir.parent / "fresh"
    shutil.copytree(run_dir, fresh_dir)
    shutil.rmtree(fresh_dir / "baseline")
    assert run_baseline(str(fresh_dir), random=3, epochs=1, quiet=True)["rows"] == res["rows"]
    # other settings than the file's: one line suggesting --fresh, nothing trained
    calls = _counting(monkeypatch)
    for kw, flag in ((dict(random=3, epochs=2), "--epochs 1, not 2"),
                     (dict(random=2, epochs=1), "--random 3, not 2"),
                     (dict(random=3, epochs=1, seed=5), "--seed 0, not 5")):
        with pytest.raises(ValueError, match=flag) as e:
            run_baseline(str(run_dir), quiet=True, **kw)
        assert "--fresh" in str(e.value) and "\n" not in str(e.value)
    assert len(calls) == 0
    # --fresh starts over with the new settings
    res = run_baseline(str(run_dir), random=1, epochs=1, quiet=True, fresh=True)
    assert len(calls) == 4 and [r["name"] for r in res["rows"]] == NAMES[:4]
    assert json.loads(path.read_text())["settings"]["random"] == 1


def _one_line_error(capsys, argv, match):
    one_line_error(capsys, argv, match, prefix="fbnet-fast baseline: error: ")


def test_missing_files_and_bad_input(run_dir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_baseline(str(tmp_path / "nothing"), random=1)
    for name, match in (("lut.json", "no lut.json: the search has not finished"),
                        ("archs/argmax.json", "no argmax.json: the search has not finished"),
                        ("archs", "no archs/: the search has not finished"),
                        ("config.json", "no config.json: not a search run directory")):
        broken = tmp_path / name.replace("/", "_")
        shutil.copytree(run_dir, broken)
        target = broken / name
        shutil.rmtree(target) if target.is_dir() else os.remove(target)
        with pytest.raises(FileNotFoundError, match=match) as e:
            run_baseline(str(broken), random=1, epochs=1, quiet=True)
        if name != "config.json":
            assert f"fbnet-fast search --out {broken} --resume" in str(e.value)
        _one_line_error(capsys, ["baseline", str(broken), "--random", "1", "--quiet"], match)
    base = ["baseline", str(run_dir), "--quiet"]
    _one_line_error(capsys, ["baseline", str(tmp_path / "nothing"), "--random", "1"],
                    "does not exist")
    _one_line_error(capsys, base + ["--random", "-1"], "--random must be an integer >= 0")
    _one_line_error(capsys, base + ["--random", "1", "--epochs", "0"],
                    "--epochs must be an integer >= 1")
    _one_line_error(capsys, base + ["--random", "many"], "invalid int value")
    _one_line_error(capsys, base, "--random")                 # required
    assert not (run_dir / "baseline").exists()


def test_cli_runs_and_refuses_changed_settings(run_dir, capsys):
    assert cli_main(["baseline", str(run_dir), "--random", "1", "--epochs", "1",
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "argmax: objective" in out and "beats" in out and "baseline.json" in out
    rows = json.loads((run_dir / "baseline" / "baseline.json").read_text())["rows"]
    assert [r["source"] for r in rows] == ["search"] * 3 + ["random"]
    _one_line_error(capsys, ["baseline", str(run_dir), "--random", "1", "--epochs", "2",
                             "--quiet"], "pass the same settings to continue it, or --fresh")
