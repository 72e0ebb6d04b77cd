"""The search end to end: artefacts, exact resume (also after SIGKILL and SIGTERM), latency
awareness, two-process DDP, and clear errors for bad input. Tiny settings: 4 layers at 16x16."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from fbnet_fast.cli import main as cli_main
from fbnet_fast.nn.models import create_model
from fbnet_fast.nn.supernet import SuperNet
from fbnet_fast.search.config import build_space, make_config
from fbnet_fast.search.data import load_data
from fbnet_fast.search.evaluate import finetune
from fbnet_fast.search.loop import run_search

sys.path.insert(0, os.path.dirname(__file__))
from search_helpers import TINY, macs_table, one_line_error, tiny_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli_args(cfg_kw: dict) -> list:
    out = []
    for k, v in cfg_kw.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


@pytest.fixture(scope="module")
def lut(tmp_path_factory):
    path = tmp_path_factory.mktemp("lut") / "lut.json"
    macs_table(tiny_config("unused")).save(path)
    return str(path)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, lut):
    """One uninterrupted tiny search, the reference for the resume tests."""
    out = tmp_path_factory.mktemp("full") / "run"
    res = run_search(tiny_config(out, lut=lut), quiet=True)
    return out, res


def _state(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_tiny_search_writes_every_artefact(full_run):
    out, res = full_run
    for name in ("config.json", "lut.json", "metrics.jsonl", "checkpoint.pt", "summary.json",
                 "archs/argmax.json", "archs/sample_1.json", "archs/sample_2.json",
                 "plots/probabilities_final.png", "plots/probabilities_evolution.png",
                 "plots/curves.png", "plots/archs.png"):
        assert os.path.getsize(out / name) > 0, name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 3 and cfg["stages"] == TINY["stages"]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for key in ("temperature", "train_loss", "train_acc", "theta_loss", "theta_acc",
                "expected_latency_ms", "entropy"):
        assert key in rows[-1]
    assert rows[0]["theta_loss"] is None and rows[1]["theta_acc"] is not None
    assert rows[2]["temperature"] < rows[1]["temperature"] == rows[0]["temperature"] == 5.0
    assert len(rows[-1]["entropy"]) == 4
    assert sorted(os.listdir(out / "theta")) == [f"epoch_{e:03d}.json" for e in range(3)]
    # θ moved away from its zero start
    assert res.net.theta.abs().max() > 0.05
    summary = json.loads((out / "summary.json").read_text())
    assert [a["name"] for a in summary["archs"]] == ["argmax", "sample_1", "sample_2"]
    for a in summary["archs"]:
        assert a["latency_ms"] > 0 and a["macs"] > 0 and a["params"] > 0
        assert 0 <= a["theta_acc"] <= 1
    assert "fine-tuned for 3 steps" in summary["theta_acc_eval"]
    model = create_model(str(out / "archs" / "argmax.json"), num_classes=10)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # plots can be redrawn on demand
    os.remove(out / "plots" / "curves.png")
    assert cli_main(["report", str(out)]) == 0
    assert os.path.exists(out / "plots" / "curves.png")


def test_resume_from_epoch_1_is_bit_identical(full_run, tmp_path, lut):
    out = tmp_path / "run"
    first = run_search(tiny_config(out, lut=lut), quiet=True, stop_after=1)
    assert first.summary is None and not os.path.exists(out / "summary.json")
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    res = run_search(tiny_config(out, lut=lut), resume=True, quiet=True)
    _assert_same_state(_state(out), _state(full_run[0]))
    assert torch.equal(res.net.theta, full_run[1].net.theta)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]


# ``fbnet-fast search ARGS`` that sends itself a signal (argv[1]) as it draws batch I of
# stream S (0: weights, 1: θ) in epoch E (argv[2] = "E,S,I", 0-based).
SIGNAL_AT = """
import os, signal, sys
from fbnet_fast.cli import main
from fbnet_fast.search import data

sig, at = getattr(signal, sys.argv[1]), tuple(map(int, sys.argv[2].split(",")))
draw = data.batches

def batches(data_, indices, batch_size, seed, epoch, stream, **kw):
    batches = draw(data_, indices, batch_size, seed, epoch, stream, **kw)
    for i, batch in enumerate(batches, kw.get("start", 0)):
        if (epoch, stream, i) == at:
            os.kill(os.getpid(), sig)
        yield batch

data.batches = batches
sys.exit(main(sys.argv[3:]))
"""


def _signalled_run(out, lut, sig: str, at: str):
    args = ["search", "--out", str(out), "--lut", lut, "--quiet"] + _cli_args(TINY)
    r = subprocess.run([sys.executable, "-c", SIGNAL_AT, sig, at] + args, cwd=ROOT,
                       env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True, timeout=300)
    return args, r


def _rows(out) -> list:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_mid_epoch_then_resume_finishes_identically(full_run, tmp_path, lut):
    # killed as it draws the second weight batch of epoch 2: one step of epoch 2 is done,
    # its checkpoint is not
    out = tmp_path / "run"
    args, killed = _signalled_run(out, lut, "SIGKILL", "1,0,1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1
    assert [r["epoch"] for r in _rows(out)] == [0]
    assert not os.path.exists(out / "summary.json")
    r = subprocess.run([sys.executable, "-m", "fbnet_fast"] + args + ["--resume"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    _assert_same_state(_state(out), _state(full_run[0]))
    assert "archs" in r.stdout and os.path.exists(out / "summary.json")


def test_sigterm_mid_epoch_checkpoints_then_resume_finishes_identically(
        full_run, tmp_path, lut, capsys, monkeypatch):
    # SIGTERM (to this process, in-process) as the second θ batch of epoch 2 is drawn: the
    # run writes a checkpoint that resumes at that step and exits with 75; --resume auto
    # finishes the same search
    from fbnet_fast.search import data
    draw = data.batches

    def batches(data_, indices, batch_size, seed, epoch, stream, **kw):
        for i, batch in enumerate(draw(data_, indices, batch_size, seed, epoch, stream, **kw),
                                  kw.get("start", 0)):
            if (epoch, stream, i) == (1, 1, 1):
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(data, "batches", batches)
    out = tmp_path / "run"
    args = ["search", "--out", str(out), "--lut", lut, "--quiet"] + _cli_args(TINY)
    assert cli_main(args) == 75
    assert capsys.readouterr().err.strip().splitlines() == [
        "fbnet-fast search: stopped: SIGTERM: a checkpoint after 1 of 3 θ steps of epoch 2 is "
        "written; rerun the same command with --resume (or --resume auto) to continue"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL      # handler put back
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (ck["epoch"], ck["position"]["phase"], ck["position"]["step"]) == (1, 1, 1)
    assert torch.load(out / "checkpoint.prev.pt", weights_only=False)["epoch"] == 1
    assert [r["epoch"] for r in _rows(out)] == [0]
    monkeypatch.setattr(data, "batches", draw)
    assert cli_main(args + ["--resume", "auto"]) == 0
    _assert_same_state(_state(out), _state(full_run[0]))
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in row.items() if k not in timing} for row in _rows(out)] == \
        [{k: v for k, v in row.items() if k not in timing} for row in _rows(full_run[0])]


@pytest.mark.parametrize("mask", ["soft", "two-path"])
def test_strong_latency_term_lowers_expected_latency(tmp_path, lut, mask):
    # Two search epochs, read from the metrics: stop_after leaves out the end of the search
    # (architectures, summary, plots); max_batches shortens the weight phase only (the θ
    # split fills 3 batches).
    kw = dict(lut=lut, epochs=3, warmup_epochs=0, max_batches=4, mask=mask)
    off = run_search(tiny_config(tmp_path / "off", latency_loss="none", **kw), quiet=True,
                     stop_after=2)
    on = run_search(tiny_config(tmp_path / "on", latency_loss="add", lam=50.0, **kw),
                    quiet=True, stop_after=2)
    lat_off = off.metrics[-1]["expected_latency_ms"]
    lat_on = on.metrics[-1]["expected_latency_ms"]
    cfg = tiny_config("x")
    start = macs_table(cfg).layer_matrix(build_space(cfg)).mean(1).sum().item() + 0.1
    assert lat_on < lat_off
    # clearly below the uniform-θ starting point (two-path moves two entries per layer a step)
    assert lat_on < {"soft": 0.8, "two-path": 0.9}[mask] * start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, cfg_kw, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    res = run_search(make_config(**cfg_kw), quiet=True)
    torch.save({k: v.detach().clone() for k, v in res.net.state_dict().items()},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path, lut):
    import torch.multiprocessing as mp
    cfg_kw = {**TINY, "out": str(tmp_path / "run"), "lut": lut, "epochs": 2,
              "warmup_epochs": 1, "samples": 1, "finetune_steps": 0, "device": "cpu"}
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg_kw, str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(s0["theta"], torch.zeros_like(s0["theta"]))
    for k in s0:
        if "running" in k or "num_batches" in k:
            continue                     # BN statistics are per process (no SyncBN)
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["world"] for r in rows] == [2, 2]
    assert os.path.exists(tmp_path / "run" / "summary.json")


# --- bad input ---------------------------------------------------------------------------

def test_bad_input_is_one_clear_line(tmp_path, capsys, lut):
    base = ["search", "--out", str(tmp_path / "r"), "--quiet"]
    one_line_error(capsys, base + ["--data", str(tmp_path / "missing")], "does not exist")
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    one_line_error(capsys, base + ["--data", str(tmp_path / "empty")], "no images")
    one_line_error(capsys, base + ["--gumbel", "sometimes"], "--gumbel must be one of")
    one_line_error(capsys, base + ["--latency-loss", "log"], "--latency-loss must be one of")
    one_line_error(capsys, base + ["--mask", "fuzzy"], "--mask must be one of")
    one_line_error(capsys, base + ["--mask", "two-path", "--gumbel", "per-example"],
                    "use --gumbel per-batch")
    one_line_error(capsys, base + ["--finetune-steps", "-1"], "--finetune-steps must be >= 0")
    one_line_error(capsys, base + ["--epochs", "many"], "invalid int value")
    one_line_error(capsys, base + ["--lut", str(tmp_path / "no.json")], "does not exist")
    # a table measured for another space does not cover this one: name the missing entry
    one_line_error(capsys, base + _cli_args({**TINY, "width": 2.0}) + ["--lut", lut],
                    "has no entry")
    one_line_error(capsys, ["report", str(tmp_path / "nothing")], "does not exist")
    one_line_error(capsys, base + ["--resume"], "nothing to resume")


def test_finetune_trains_the_extracted_architecture_only():
    """Fine-tuned on 32 images, an extracted path fits them; the supernet is not touched."""
    cfg = tiny_config("unused")
    data = load_data(cfg, cfg.resolution)
    data = dataclasses.replace(data, weight_idx=data.weight_idx[:32])
    torch.manual_seed(0)
    net = SuperNet(build_space(cfg), data.num_classes, backend="reference")
    stem = net.stem[0].weight.detach().clone()
    model = net.extract(["k3_e6"] * 4)
    x, y = data.train[0][data.weight_idx], data.train[1][data.weight_idx]

    def loss():
        model.train()    # batch statistics on both sides: compare the weights
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    before = loss()
    finetune(model, data, steps=80, lr=0.05, batch_size=16, seed=0, device="cpu",
             channels_last=False)
    assert before > 2.0 and loss() < 0.5 * before
    assert torch.equal(net.stem[0].weight, stem)
    with pytest.raises(ValueError, match="at least one batch of 64"):
        finetune(model, data, steps=1, lr=0.1, batch_size=64, seed=0, device="cpu",
                 channels_last=False)


def test_python_api_errors(tmp_path, lut, capsys):
    with pytest.raises(ValueError, match="gumbel"):
        make_config(gumbel="per-pixel")
    with pytest.raises(ValueError, match="warmup"):
        make_config(epochs=2, warmup_epochs=3)
    with pytest.raises(ValueError, match="stages"):
        make_config(stages="16-1-1")
    with pytest.raises(FileNotFoundError):
        run_search(tiny_config(tmp_path / "a", data=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="has no entry"):
        run_search(tiny_config(tmp_path / "b", lut=lut, resolution=24))
    one_step = dict(lut=lut, epochs=2, warmup_epochs=1, max_batches=1)
    run_search(tiny_config(tmp_path / "c", **one_step), quiet=True, stop_after=1)
    with pytest.raises(ValueError, match="already holds a search"):
        run_search(tiny_config(tmp_path / "c", **one_step))
    one_line_error(capsys, ["search", "--out", str(tmp_path / "c"), "--resume", "--epochs",
                             "5"], "--epochs 5 differs from the run's 2")


def test_train_from_scratch_writes_result_and_resumes(full_run, tmp_path, capsys):
    from fbnet_fast.search.train import TrainConfig, train
    arch = str(full_run[0] / "archs" / "argmax.json")
    out = tmp_path / "train"
    kw = dict(arch=arch, out=str(out), epochs=2, batch_size=16, builtin_train=128,
              builtin_val=32, threads=1)
    res = train(TrainConfig(**kw), quiet=True)
    assert 0 <= res["top1"] <= 1 and res["num_classes"] == 10
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and "val_top1" in rows[-1]
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 2
    again = train(TrainConfig(**kw), resume=True, quiet=True)      # nothing left to do
    assert again["top1"] == res["top1"]
    one_line_error(capsys, ["train", arch, "--out", str(out), "--resume", "--epochs", "5"],
                    "differs")
    one_line_error(capsys, ["train", "no_such_arch", "--out", str(tmp_path / "x")],
                    "unknown architecture")
