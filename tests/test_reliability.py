"""What long runs meet, one injected fault per item (docs/search.md, "Faults"): non-finite
losses (stop and skip), the checkpoint clock and signals, a corrupt latest checkpoint, a
full disk during a save, undecodable images (search and train), and a failing rank.
SIGTERM in the middle of an epoch, then --resume, is in test_search.py next to SIGKILL."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fbnet_fast.cli import main as cli_main
from fbnet_fast.nn.architecture import Architecture
from fbnet_fast.search import loop
from fbnet_fast.search.config import build_space
from fbnet_fast.search.distributed import Dist
from fbnet_fast.search.faults import (EXIT_PREEMPTED, EXIT_STOPPED, RunStopped, StepGuard,
                                      first_nonfinite)
from fbnet_fast.search.loop import run_search
from fbnet_fast.search.rundir import json_line

sys.path.insert(0, os.path.dirname(__file__))
from search_helpers import TINY, macs_table, tiny_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two epochs (warm-up, then search) of two weight and two θ steps.
SHORT = dict(epochs=2, warmup_epochs=1, max_batches=2, samples=1, finetune_steps=0)


@pytest.fixture(scope="module")
def lut(tmp_path_factory):
    path = tmp_path_factory.mktemp("lut") / "lut.json"
    macs_table(tiny_config("unused")).save(path)
    return str(path)


def _strict_rows(path) -> list:
    def reject(name):
        raise ValueError(f"{name} in {path}")
    return [json.loads(line, parse_constant=reject) for line in open(path).read().splitlines()]


def _ck(path) -> dict:
    return torch.load(path, weights_only=False)


class _NaNAt:
    """A criterion that returns NaN at the given calls (0-based, weight and θ steps alike)."""

    def __init__(self, calls):
        self.calls, self.n = calls, 0

    def wrap(self, cls):
        outer = self

        class Poisoned(cls):
            def forward(self, *a, **kw):
                loss = super().forward(*a, **kw)
                outer.n += 1
                return loss * float("nan") if outer.n - 1 in outer.calls else loss
        return Poisoned


# --- non-finite values -------------------------------------------------------------------

def test_nonfinite_stop_names_the_step_and_keeps_the_last_checkpoint(tmp_path, lut, capsys,
                                                                     monkeypatch):
    # calls 0-1: epoch 1 (warm-up, 2 weight steps); call 3 is the second weight step of epoch 2
    monkeypatch.setattr(loop, "FBNetLoss", _NaNAt({3}).wrap(loop.FBNetLoss))
    out = tmp_path / "run"
    argv = ["search", "--out", str(out), "--lut", lut, "--quiet"] + _cli(TINY, SHORT)
    assert cli_main(argv) == EXIT_STOPPED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "non-finite values (loss at epoch 2, weight step 2/2)" in err and "--w-lr" in err
    ck = _ck(out / "checkpoint.pt")
    assert ck["epoch"] == 1 and first_nonfinite(ck) is None
    assert [r["epoch"] for r in _strict_rows(out / "metrics.jsonl")] == [0]
    assert sorted(os.listdir(out / "theta")) == ["epoch_000.json"]


def test_nonfinite_skip_drops_the_steps_and_every_file_stays_finite(tmp_path, lut, capsys,
                                                                    monkeypatch):
    # a weight step of the warm-up and the first θ step of epoch 2 (calls 0-1, 2-3, 4-5)
    monkeypatch.setattr(loop, "FBNetLoss", _NaNAt({1, 4}).wrap(loop.FBNetLoss))
    out = tmp_path / "run"
    res = run_search(tiny_config(out, lut=lut, nonfinite="skip", **SHORT), quiet=True,
                     stop_after=2)        # the end of the search (plots ...) is not needed
    err = capsys.readouterr().err
    assert err.count("step skipped (1 in a row)") == 2
    assert "loss at epoch 1, weight step 2/2" in err and "θ step 1/2" in err
    rows = _strict_rows(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["train_loss"] > 0 and r["theta_loss"] != 0 for r in rows)
    assert first_nonfinite(_ck(out / "checkpoint.pt")) is None
    for name in os.listdir(out / "theta"):
        assert np.isfinite(json.loads((out / "theta" / name).read_text())["theta"]).all()
    assert torch.isfinite(res.net.theta).all() and res.net.theta.abs().max() > 0
    for b in res.net.buffers():
        assert torch.isfinite(b.float()).all()      # the skipped step's BN update was undone


def test_nonfinite_skip_stops_after_the_limit(tmp_path, lut, monkeypatch):
    monkeypatch.setattr(loop, "FBNetLoss", _NaNAt(set(range(2, 99))).wrap(loop.FBNetLoss))
    with pytest.raises(RunStopped, match=r"loss at epoch 2, weight step 2/2, after 1 skipped "
                                         r"steps in a row \(--nonfinite-skips\)"):
        run_search(tiny_config(tmp_path / "run", lut=lut, nonfinite="skip", nonfinite_skips=1,
                               **SHORT), quiet=True)


def test_strict_json_and_the_finite_check():
    assert json_line({"loss": float("nan"), "lat": [1.5, float("inf")]}) == \
        '{"loss": null, "lat": [1.5, null]}\n'
    state = {"model": {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])},
             "steps": torch.tensor([3])}
    assert first_nonfinite(state) == "model.b"
    assert first_nonfinite({"opt": [{"lr": 0.1}]}) is None


# --- the checkpoint clock and signals ------------------------------------------------------

def test_guard_checkpoint_clock_and_signal():
    now = [0.0]
    before = signal.getsignal(signal.SIGINT)   # SIG_IGN when started in the background
    with StepGuard(Dist(), every_minutes=2, clock=lambda: now[0]) as guard:
        assert signal.getsignal(signal.SIGINT) not in (before, signal.default_int_handler)
        assert guard.before_step(None) is None
        now[0] = 119.0
        assert guard.before_step(None) is None
        now[0] = 120.0
        assert guard.before_step(None) == "checkpoint"
        guard.checkpointed()
        assert guard.before_step(None) is None
        os.kill(os.getpid(), signal.SIGTERM)       # handled at once, in this thread
        assert guard.signal == signal.SIGTERM and guard.before_step(None) == "stop"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # a second one kills
        with pytest.raises(ValueError, match="bad.png"):
            guard.before_step("cannot decode image bad.png")
    assert signal.getsignal(signal.SIGINT) is before     # restored


def test_resume_auto_starts_then_continues(tmp_path, lut):
    cfg = tiny_config(tmp_path / "run", lut=lut, **{**SHORT, "max_batches": 1})
    first = run_search(cfg, resume="auto", quiet=True, stop_after=1)
    assert [m["epoch"] for m in first.metrics] == [0]
    second = run_search(cfg, resume="auto", quiet=True, stop_after=2)
    assert [m["epoch"] for m in second.metrics] == [0, 1]
    assert _ck(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2
    assert _ck(tmp_path / "run" / "checkpoint.prev.pt")["epoch"] == 1


def test_train_sigterm_mid_epoch_then_resume_is_identical(tmp_path, monkeypatch):
    from fbnet_fast.search import data
    from fbnet_fast.search.faults import Preempted
    from fbnet_fast.search.train import TrainConfig, train
    arch = tmp_path / "arch.json"
    Architecture(["k3_e1"] * 4, space=build_space(tiny_config("unused"))).save(arch)
    kw = dict(arch=str(arch), epochs=2, batch_size=16, builtin_train=96, builtin_val=32,
              threads=1)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **kw), quiet=True)
    draw = data.batches

    def batches(*a, **kw_):
        for i, batch in enumerate(draw(*a, **kw_), kw_.get("start", 0)):
            if (a[4], i) == (1, 2):                  # epoch 2, third batch
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(data, "batches", batches)
    out = tmp_path / "cut"
    with pytest.raises(Preempted, match="after 2 of 6 steps of epoch 2"):
        train(TrainConfig(out=str(out), **kw), quiet=True)
    assert _ck(out / "checkpoint.pt")["position"]["step"] == 2
    monkeypatch.setattr(data, "batches", draw)
    again = train(TrainConfig(out=str(out), **kw), resume="auto", quiet=True)
    assert again["top1"] == whole["top1"]
    a, b = _ck(out / "checkpoint.pt")["model"], _ck(tmp_path / "whole" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _strict_rows(out / "metrics.jsonl")[1]["train_loss"] == \
        _strict_rows(tmp_path / "whole" / "metrics.jsonl")[1]["train_loss"]


# --- checkpoints -----------------------------------------------------------------------

def test_truncated_checkpoint_falls_back_to_the_previous(tmp_path, lut, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(out, lut=lut, **{**SHORT, "epochs": 3, "max_batches": 1})
    run_search(cfg, quiet=True, stop_after=2)
    good = _ck(out / "checkpoint.pt")["model"]
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[:len(data) // 2])
    capsys.readouterr()
    run_search(cfg, resume=True, quiet=True, stop_after=2)      # redoes epoch 2
    err = capsys.readouterr().err
    assert "checkpoint.pt cannot be read" in err and "resuming from checkpoint.prev.pt " \
                                                       "(epoch 1)" in err
    again = _ck(out / "checkpoint.pt")["model"]
    assert all(torch.equal(good[k], again[k]) for k in good)
    # both unusable: one clear error
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="no usable checkpoint .*checkpoint.prev.pt cannot "
                                         "be read"):
        run_search(cfg, resume=True, quiet=True)


def test_full_disk_during_a_save_leaves_both_checkpoints(tmp_path, lut, capsys, monkeypatch):
    out = tmp_path / "run"
    save, calls = torch.save, []

    def full_disk(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    kw = {**SHORT, "epochs": 4, "max_batches": 1}
    argv = ["search", "--out", str(out), "--lut", lut, "--quiet"] + _cli(TINY, kw)
    assert cli_main(argv) == EXIT_STOPPED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "No space left on device" in err and "checkpoint.prev.pt are as they were" in err
    assert _ck(out / "checkpoint.pt")["epoch"] == 2
    assert _ck(out / "checkpoint.prev.pt")["epoch"] == 1
    assert not os.path.exists(out / "checkpoint.pt.tmp")
    monkeypatch.setattr(torch, "save", save)
    run_search(tiny_config(out, lut=lut, **kw), resume=True, quiet=True, stop_after=3)
    assert [r["epoch"] for r in _strict_rows(out / "metrics.jsonl")] == [0, 1, 2]


# --- undecodable images ------------------------------------------------------------------

def _folder_with_a_bad_image(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("val", 2)):
        for c in range(2):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    d / f"img_{i}.png")
    bad = root / "train" / "class_1" / "img_3.png"
    bad.write_bytes(b"this is not a png")
    return str(bad)


def test_bad_image_stops_search_and_train_unless_skipped(tmp_path, capsys):
    bad = _folder_with_a_bad_image(tmp_path / "data")
    cfg = tiny_config("unused", classes=None)
    lut = tmp_path / "lut.json"
    macs_table(cfg, num_classes=2).save(lut)
    base = ["--data", str(tmp_path / "data"), "--quiet", "--workers", "1"]
    search = ["search", "--lut", str(lut)] + _cli(TINY, {"epochs": 1, "warmup_epochs": 0,
                                                         "batch_size": 4, "samples": 0,
                                                         "finetune_steps": 0}) + base
    assert cli_main(search + ["--out", str(tmp_path / "s1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"cannot decode image {bad}" in err and "--skip-bad-images" in err
    assert cli_main(search + ["--out", str(tmp_path / "s2"), "--skip-bad-images"]) == 0
    assert f"skipped undecodable image {bad}" in capsys.readouterr().err
    summary = json.loads((tmp_path / "s2" / "summary.json").read_text())
    assert summary["skipped_images"] >= 1     # the search epoch, then the final evaluation

    arch = tmp_path / "arch.json"
    Architecture(["k3_e1"] * 4, space=build_space(cfg)).save(arch)
    train = ["train", str(arch), "--epochs", "1", "--batch-size", "4", "--threads", "1"] + base
    assert cli_main(train + ["--out", str(tmp_path / "t2"), "--skip-bad-images"]) == 0
    assert json.loads((tmp_path / "t2" / "result.json").read_text())["skipped_images"] == 1


# --- a failing rank ----------------------------------------------------------------------

# ``fbnet-fast search ARGS`` as rank RANK of 2; rank 1 raises as it draws its second batch.
FAIL_ON_RANK_1 = """
import os, sys
rank, port = sys.argv[1], sys.argv[2]
os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=port)
from fbnet_fast.cli import main
from fbnet_fast.search import data

draw = data.batches

def batches(*a, **kw):
    for i, batch in enumerate(draw(*a, **kw)):
        if rank == "1" and i == 1:
            raise RuntimeError("injected fault")
        yield batch

data.batches = batches
sys.exit(main(sys.argv[3:]))
"""


def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path, lut):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["search", "--out", str(tmp_path / "run"), "--lut", lut, "--quiet",
            "--device", "cpu"] + _cli(TINY, SHORT)
    procs = [subprocess.Popen([sys.executable, "-c", FAIL_ON_RANK_1, str(r), port] + args,
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    # The bound: a rank left waiting in a collective would wait for gloo's 30 minutes.
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert procs[1].returncode == 1 and "injected fault" in errs[1]
    assert procs[0].returncode == EXIT_STOPPED, errs[0]
    assert errs[0].strip().splitlines()[-1] == ("fbnet-fast search: error: stopped because "
                                                "rank 1: RuntimeError: injected fault")


def _cli(*dicts) -> list:
    out = []
    for k, v in {k: v for d in dicts for k, v in d.items()}.items():
        if v is not None:
            out += [f"--{k.replace('_', '-')}", str(v)]
    return out


assert EXIT_PREEMPTED == 75      # documented in docs/search.md and `fbnet-fast search -h`
