"""ONNX: every candidate block and FBNet-C exported with torch.onnx match PyTorch in ONNX
Runtime; ``fbnet-fast export`` with a training checkpoint; tables measured in ONNX Runtime
record their runtime; a missing optional extra is one clear error."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from fbnet_fast.cli import main
from fbnet_fast.latency.keys import required_keys, stem_key
from fbnet_fast.latency.loss import FBNetLoss
from fbnet_fast.latency.measuring import measure
from fbnet_fast.latency.runtimes import ONNX_EXTRA, chain, export_many, run_onnx
from fbnet_fast.latency.table import LatencyTable
from fbnet_fast.nn.architecture import Architecture
from fbnet_fast.nn.blocks import build_block
from fbnet_fast.nn.models import create_model
from fbnet_fast.nn.space import SearchSpace
from test_latency import TINY

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics and affine parameters, so no layer is an identity and no
    activation fades to zero (fresh blocks zero-initialise their last BN)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(c, generator=g))
    return model.eval()


def close(got, want, rtol=1e-4):
    """|got - want| within rtol of the largest |want| (never compared on zeros)."""
    scale = want.abs().max()
    assert scale > 1e-3
    assert (got - want).abs().max() <= rtol * scale


def test_every_candidate_block_in_onnx_runtime_matches_pytorch():
    space = SearchSpace()
    # each candidate with a residual (16 -> 16, stride 1) and without (16 -> 24, stride 2);
    # skip is the identity in the first and a 1x1 conv in the second
    shapes = [(16, 16, 1), (16, 24, 2)]
    mods = [randomize(build_block(c, ci, co, s), i)
            for i, (c, (ci, co, s)) in enumerate((c, sh) for sh in shapes
                                                 for c in space.candidates)]
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, m_ci, 8, 8, generator=g) for (m_ci, _, _) in
          [sh for sh in shapes for _ in space.candidates]]
    models = export_many(mods, xs)           # one export, cut into one model per block
    assert len(models) == len(mods) == 2 * len(space.candidates)
    with torch.no_grad():
        for m, x, model in zip(mods, xs, models):
            close(run_onnx(model, x), m(x))


def test_a_network_chained_from_its_ops_exports_is_the_network():
    """The fits in ONNX Runtime time networks chained from their ops' models: the same
    function as the network (an identity skip and a residual block included)."""
    arch = Architecture(["k3_e3", "k5_e1", "skip", "k3_e1"], TINY)   # skip: identity
    model = randomize(create_model(arch, num_classes=10), seed=2)
    parts = [model.stem, *model.blocks,
             torch.nn.Sequential(model.head, model.pool, torch.nn.Flatten(1), model.classifier)]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 16, 16, generator=g)
    xs, h = [], x
    with torch.no_grad():
        for p in parts:
            xs.append(torch.randn(h.shape, generator=g))     # each op exported on its own
            h = p(h)
        close(run_onnx(chain(export_many(parts, xs)), x), model(x))


def test_export_cli_fbnet_c_with_a_training_checkpoint(tmp_path, capsys):
    model = randomize(create_model("fbnet_c", num_classes=10), seed=3)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 1, "model": model.state_dict(), "opt": {}, "rng": {}, "world": 1},
               run / "checkpoint.pt")
    out = tmp_path / "c.onnx"
    assert main(["export", "fbnet_c", "--onnx", str(out), "--checkpoint", str(run)]) == 0
    said = capsys.readouterr().out
    assert "fbnet_c 224x224, 10 classes; ONNX Runtime matches PyTorch" in said
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        close(run_onnx(str(out), x), model(x))   # the trained weights, not fresh ones


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    model = create_model("fbnet_b", num_classes=10)
    ck = tmp_path / "ck.pt"
    torch.save({"epoch": 1, "model": model.state_dict()}, ck)
    out = str(tmp_path / "x.onnx")
    cases = [
        (["export", "fbnet_c"], "give an output format: --onnx OUT.onnx"),
        (["export", "fbnet_c", "--onnx", out, "--checkpoint", str(ck)],
         "does not fit architecture fbnet_c"),
        (["export", "fbnet_b", "--onnx", out, "--checkpoint", str(ck), "--num-classes", "5"],
         "--num-classes 5 but the checkpoint's classifier has 10 classes"),
        (["export", "fbnet_c", "--onnx", out, "--checkpoint", str(tmp_path / "none.pt")],
         "does not exist"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err


def test_missing_extra_names_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)     # import fails as if absent
    with pytest.raises(ImportError, match=f"onnxruntime.*{ONNX_EXTRA.replace('[', '.')}"):
        measure(TINY, runtime="onnxruntime", num_classes=10, progress=False)
    argv = ["lut", "measure", "--runtime", "onnxruntime", "--out", str(tmp_path / "t.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "fbnet_fast[onnx]"' in err
    assert main(["export", "fbnet_c", "--onnx", str(tmp_path / "c.onnx")]) == 2
    assert 'pip install "fbnet_fast[onnx]"' in capsys.readouterr().err


def test_onnxruntime_table_records_its_runtime_and_validates_there(tmp_path, capsys):
    import onnxruntime
    table = measure(TINY, runtime="onnxruntime", method="fitted", reps=3, warmup=1,
                    threads=1, retries=0, calib_samples=5, num_classes=10, progress=False)
    assert set(table.entries) == set(required_keys(TINY, 10))
    # fitted to networks chained from the ops' models (per type, or one scale when the
    # timings cannot tell the types apart: both are the table's predictions)
    cal = table.calibration
    assert len(cal["networks"]) == 5 and "least squares" in cal["fit"]
    assert cal["fitted_ms"] == pytest.approx(
        [table.latency(Architecture(n, TINY)) for n in cal["networks"]])
    # the ops of this tiny space cost about a session run, which is taken off all but the
    # stem: they may come out at zero; the stem keeps the network's one run
    for k, e in table.entries.items():
        assert e.median >= 0 and e.count == 3 and e.ci >= 0, k
    assert table.value(stem_key(TINY)) > 0
    m = table.meta
    assert (m["runtime_name"], m["runtime_version"]) == ("onnxruntime", onnxruntime.__version__)
    assert m["run_overhead_ms"] > 0              # a session run's cost, taken off the ops
    assert m["runtime"].startswith("onnxruntime ") and m["threads"] == 1
    table.save(tmp_path / "ort.json")
    back = LatencyTable.load(tmp_path / "ort.json")
    assert back.meta == table.meta and back.entries == table.entries
    # a search reads it like any other table: the loss's latency term, differentiable. The
    # additive loss has d loss / d masks = lam * LUT exactly, whatever the timings (this
    # tiny space's ops may all come out at zero, and "mult" clamps a LAT below e us)
    masks = torch.softmax(torch.randn(TINY.num_layers, TINY.num_candidates), -1)
    masks.requires_grad_(True)
    loss = FBNetLoss(back, mode="add", lam=0.5)(torch.randn(4, 10), torch.arange(4), masks)
    loss.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(masks.grad, 0.5 * back.layer_matrix(TINY))
    with pytest.raises(ValueError, match="method 'context' times blocks inside eager"):
        measure(TINY, runtime="onnxruntime", method="context", progress=False)
    # validate times whole networks in the table's runtime, benchmark-style
    rep = tmp_path / "rep.json"
    assert main(["lut", "validate", str(tmp_path / "ort.json"), "--samples", "2", "--reps",
                 "2", "--warmup", "1", "--rounds", "1", "--no-progress", "--json",
                 str(rep)]) == 0
    assert "in onnxruntime" in capsys.readouterr().out
    got = json.loads(rep.read_text())
    assert got["runtime"] == "onnxruntime" and len(got["rows"]) == 2
    assert all(r["measured_ms"] > 0 for r in got["rows"])
