"""timm: an architecture exported as timm EfficientNet block strings builds timm's own
FBNet-C for FBNet-C; weights under timm's names give the same outputs (identity and
shape-changing skips included); what timm cannot express is a clear error; the CLI prints
a file that registers the model with timm and, with a checkpoint, writes loadable weights."""
from __future__ import annotations

import ast
import inspect
import runpy
import sys
import textwrap

import pytest
import torch

from fbnet_fast.cli import main
from fbnet_fast.nn.architecture import ZOO, Architecture
from fbnet_fast.nn.models import create_model
from fbnet_fast.nn.space import SearchSpace
from fbnet_fast.nn.timm_format import (TIMM_EXTRA, MissingTimm, create_timm_model, to_timm,
                                       timm_state_dict)
from fbnet_fast.testing import randomize

timm = pytest.importorskip("timm")
from timm.models import efficientnet  # noqa: E402


def timm_fbnetc_arch_def() -> list:
    """The ``arch_def`` literal of timm's own FBNet-C (``_gen_fbnetc``), read from timm's
    source, so the test compares against timm and not against a copy."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(efficientnet._gen_fbnetc)))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", None) == "arch_def")
    return ast.literal_eval(node.value)


def structure(model) -> list:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def layers(model, kind) -> list:
    """Every conv's or BN's settings, in module order."""
    if kind is torch.nn.Conv2d:
        return [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.groups,
                 m.bias is None) for m in model.modules() if isinstance(m, kind)]
    return [(m.num_features, m.eps, m.momentum, m.affine) for m in model.modules()
            if isinstance(m, kind)]


def random_model(arch, num_classes=10, seed=0, size=113, dtype=torch.float64):
    """An FBNet with random weights and random BN statistics around those of random data:
    ``randomize``'s statistics alone let the input fade out over 22 blocks, leaving outputs
    that hardly depend on it (and a wrong early layer unseen)."""
    g = torch.Generator().manual_seed(seed)
    model = randomize(create_model(arch, num_classes), g).to(dtype)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.momentum = 1.0
        model.train()(torch.randn(4, 3, size, size, generator=g, dtype=dtype))
        for bn in bns:
            bn.momentum = 0.1
            c = bn.num_features
            bn.running_mean.add_(0.1 * torch.randn(c, generator=g, dtype=dtype)
                                 * bn.running_var.sqrt())
            bn.running_var.mul_(0.5 + torch.rand(c, generator=g, dtype=dtype))
    return model.eval()


def close(got, want):
    """Within a tiny fraction of the largest |want| (float64: 1e-10; float32: 1e-5)."""
    tol = 1e-10 if want.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def same_outputs(arch, num_classes=10, size=113, seed=0):
    """An FBNet of ``arch`` with random weights and BN statistics, and timm's model with its
    exported weights (strict): the same function in eval mode, and in training mode the same
    outputs and the same running statistics afterwards (BN momentum). Odd sizes: every
    stride-2 layer sees an odd input, where padding conventions differ."""
    ours = random_model(arch, num_classes, seed, size=size)
    g = torch.Generator().manual_seed(seed + 100)
    theirs = create_timm_model(arch, num_classes).double().eval()
    weights = {k: v.clone() for k, v in timm_state_dict(ours).items()}
    assert set(weights) == set(theirs.state_dict())
    theirs.load_state_dict(weights, strict=True)
    assert sum(p.numel() for p in theirs.parameters()) == \
        sum(p.numel() for p in ours.parameters())
    x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = ours(x)
        assert (want[0] - want[1]).abs().max() > 0.05 * want.abs().max()    # input matters
        close(theirs(x), want)
        ours.train(), theirs.train()
        close(theirs(x), ours(x))
    after = timm_state_dict(ours)
    for k, v in theirs.state_dict().items():
        if v.is_floating_point():
            close(v, after[k])
        else:
            assert v == after[k] == weights[k] + 1, k     # num_batches_tracked
    assert not torch.equal(after["bn1.running_mean"], weights["bn1.running_mean"])


def test_fbnet_c_is_timms_fbnetc_100():
    t = to_timm("fbnet_c")
    assert t.arch_def == timm_fbnetc_arch_def()
    assert t.kwargs == {"stem_size": 16, "num_features": 1984}
    ours = create_timm_model("fbnet_c")
    ref = timm.create_model("fbnetc_100")
    assert structure(ours) == structure(ref)
    assert sum(p.numel() for p in ours.parameters()) == 5_572_200
    fbnet = create_model("fbnet_c")
    assert sum(p.numel() for p in fbnet.parameters()) == 5_572_200
    # the same convs (stride, padding, groups, no bias) and BNs (eps 1e-5, momentum 0.1) as
    # fbnet_fast's, in the same order; every activation is a ReLU, as ours
    for kind in (torch.nn.Conv2d, torch.nn.BatchNorm2d):
        assert layers(ours, kind) == layers(fbnet, kind)
    acts = [type(m.act) for m in ours.modules() if hasattr(m, "act")]
    # stem, head and 21 blocks of 3 BNs; the third BN of a block (the linear 1x1) has none
    assert acts == [torch.nn.ReLU] + [torch.nn.ReLU, torch.nn.ReLU, torch.nn.Identity] * 21 \
        + [torch.nn.ReLU]
    assert type(ours.global_pool.pool) is torch.nn.AdaptiveAvgPool2d
    assert (ours.classifier.in_features, ours.classifier.out_features) == (1984, 1000)


def test_fbnet_c_weights_give_the_same_outputs_in_timm():
    same_outputs("fbnet_c")


def test_identity_and_shape_changing_skips_round_trip():
    blocks = list(ZOO["fbnet_c"].blocks)
    for i in (0, 5, 7, 13, 15):   # identity (a whole stage), conv s2, identity, conv s1, identity
        blocks[i] = "skip"
    arch = Architecture(blocks, SearchSpace())
    t = to_timm(arch)
    assert t.arch_def == [
        ["ir_r1_k3_s2_e6_c24", "ir_r2_k3_s1_e1_c24"],
        ["cn_r1_k1_s2_c32", "ir_r1_k5_s1_e3_c32", "ir_r1_k3_s1_e6_c32"],
        ["ir_r1_k5_s2_e6_c64", "ir_r1_k5_s1_e3_c64", "ir_r2_k5_s1_e6_c64"],
        ["cn_r1_k1_s1_c112", "ir_r1_k5_s1_e6_c112", "ir_r1_k5_s1_e3_c112"],
        ["ir_r4_k5_s2_e6_c184"],
        ["ir_r1_k3_s1_e6_c352"],
    ]
    skipped = [i for i, p in enumerate(t.places) if p is None]
    assert skipped == [0, 2, 7, 15] and t.places[5] == (1, 0) and t.places[13] == (3, 0)
    same_outputs(arch, seed=1)


def test_what_timm_cannot_express_is_a_clear_error():
    for arch in ("fbnet_a", ZOO["fbnet_a"]):
        with pytest.raises(ValueError, match=r"layer 12 \(k5_e1_g2\): timm has no channel "
                                             "shuffle"):
            to_timm(arch)
    with pytest.raises(ValueError, match="no channel shuffle"):
        create_timm_model("fbnet_a")
    small = Architecture(ZOO["fbnet_c"].blocks, SearchSpace.small())
    with pytest.raises(ValueError, match=r"small \(32x32\) variant's stem has stride 1, but "
                                         "timm's EfficientNet stem has a fixed stride of 2"):
        to_timm(small)
    odd = Architecture(ZOO["fbnet_c"].blocks,
                       SearchSpace(channels=(16, 16, 24, 36, 64, 112, 184, 352)))
    with pytest.raises(ValueError, match="layer 6 .* 36 channels; timm's EfficientNet rounds "
                                         "channels to multiples of 8"):
        to_timm(odd)


@pytest.mark.filterwarnings("ignore:Overwriting fbnet_c in registry")
def test_export_cli_prints_a_file_that_registers_fbnet_c_with_timm(tmp_path, capsys):
    assert main(["export", "fbnet_c", "--timm"]) == 0
    path = tmp_path / "fbnet_c_timm.py"
    path.write_text(capsys.readouterr().out)
    ns = runpy.run_path(str(path), run_name="fbnet_c_timm")    # registers "fbnet_c" with timm
    assert ns["ARCH_DEF"] == timm_fbnetc_arch_def()
    assert ns["KWARGS"] == {"stem_size": 16, "num_features": 1984}
    assert structure(timm.create_model("fbnet_c", num_classes=10)) == \
        structure(timm.create_model("fbnetc_100", num_classes=10))


@pytest.mark.filterwarnings("ignore:Overwriting fbnet_c in registry")
def test_export_cli_writes_timm_weights_of_a_training_checkpoint(tmp_path, capsys):
    model = random_model("fbnet_c", seed=3, size=224, dtype=torch.float32)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"epoch": 1, "model": model.state_dict(), "opt": {}, "rng": {}, "world": 1},
               run / "checkpoint.pt")
    out = tmp_path / "c.pth"
    argv = ["export", "fbnet_c", "--timm", "--checkpoint", str(run), "--out", str(out)]
    assert main(argv) == 0
    source = capsys.readouterr().out
    assert source.startswith(f"# wrote {out}: timm's model with these weights matches "
                             "fbnet_fast's")
    # the printed file, run as a script, builds the model in timm and loads the weights
    path = tmp_path / "fbnet_c_timm.py"
    path.write_text(source)
    ns = runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out == f"{5_572_200 - 1000 * 1985 + 10 * 1985} parameters\n"
    theirs = ns["model"].eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(x)
        assert (want[0] - want[1]).abs().max() > 0.05 * want.abs().max()
        close(theirs(x), want)
    loaded = torch.load(out)
    assert set(loaded) == set(theirs.state_dict())


def test_export_cli_timm_errors_are_one_line(tmp_path, capsys, monkeypatch):
    ck = tmp_path / "ck.pt"
    torch.save({"epoch": 1, "model": create_model("fbnet_c", num_classes=10).state_dict()}, ck)
    out = str(tmp_path / "c.pth")
    cases = [
        (["export", "fbnet_c", "--timm", "--checkpoint", str(ck)],
         "--timm with --checkpoint writes timm weights: give --out FILE.pth"),
        (["export", "fbnet_c", "--timm", "--out", out], "give --timm and --checkpoint"),
        (["export", "fbnet_a", "--timm"], "layer 12 (k5_e1_g2): timm has no channel shuffle"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    # without timm: the block strings still print; building or writing weights names the extra
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "timm.models.efficientnet", None)
    with pytest.raises(MissingTimm, match=TIMM_EXTRA.replace("[", ".")):
        create_timm_model("fbnet_c")
    assert main(["export", "fbnet_c", "--timm"]) == 0
    assert "ARCH_DEF = [" in capsys.readouterr().out
    assert main(["export", "fbnet_c", "--timm", "--checkpoint", str(ck), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "fbnet_fast[timm]"' in err
    assert not (tmp_path / "c.pth").exists()
