"""The fused plan (backends/plan.py) and its BN math against plain PyTorch, in float64:
what the plan says about a layout must be what the unfused block does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fbnet_fast.backends.plan import (batch_stats, bn_coef, bn_grad, dw_weights, plan_for,
                                      update_running)
from fbnet_fast.nn.blocks import channel_shuffle
from fbnet_fast.nn.layout import BN_EPS, BN_MOMENTUM, MixedLayout
from fbnet_fast.nn.space import CANDIDATES

DT = torch.float64
LAYOUTS = [
    (16, 24, 2, CANDIDATES),
    (24, 24, 1, CANDIDATES),
    (8, 16, 2, ("k3_e1_g2", "skip", "k5_e3", "k3_e6", "k5_e1_g2")),   # kernel sizes interleaved
    (8, 8, 1, ("k5_e1", "k3_e3", "k3_e6")),                            # nothing grouped
]


@pytest.fixture(params=LAYOUTS, ids=lambda p: f"{p[0]}-{p[1]}-s{p[2]}-{len(p[3])}")
def layout(request):
    c_in, c_out, stride, cands = request.param
    return MixedLayout.build(c_in, c_out, stride, tuple(cands))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def _grouped(L) -> bool:
    return any(s.spec.groups > 1 for s in L.slots)


# --- the plan of a layout ---------------------------------------------------------------------

def test_shuffle_is_the_channel_shuffle(layout):
    """Expanded column r holds what channel_shuffle puts there, candidate by candidate."""
    plan = plan_for(layout)
    a = torch.randn(2, layout.total_mid, 3, 3, dtype=DT)   # first 1x1 outputs, stored order
    ref = torch.cat([channel_shuffle(a[:, s.mid_offset:s.mid_offset + s.mid], s.spec.groups)
                     for s in layout.slots], 1)
    rows = a.permute(1, 0, 2, 3)                           # channels first for shuffle()
    torch.testing.assert_close(plan.shuffle(rows).permute(1, 0, 2, 3), ref)
    torch.testing.assert_close(plan.unshuffle(plan.shuffle(rows)), rows)
    assert (plan.perm is None) == (not _grouped(layout))


def test_dense_first_pointwise_is_block_diagonal_then_shuffled(layout):
    plan = plan_for(layout)
    C, T = layout.in_channels, layout.total_mid
    w = torch.randn(layout.pw1_numel, dtype=DT)
    x = torch.randn(2, C, 3, 3, dtype=DT)
    dense = plan.dense_pw1(w).view(T, C, 1, 1)
    ref = torch.cat([channel_shuffle(F.conv2d(x, layout.pw1(w, s), groups=s.spec.groups),
                                     s.spec.groups) for s in layout.slots], 1)
    torch.testing.assert_close(F.conv2d(x, dense), ref)
    torch.testing.assert_close(plan.packed_pw1(plan.dense_pw1(w)), w)
    blocks = [torch.block_diag(*layout.pw1(w, s).view(s.mid, -1).chunk(s.spec.groups))
              for s in layout.slots]
    torch.testing.assert_close(plan.unshuffle(dense.view(T, C)), torch.cat(blocks))


def test_second_pointwise_groups(layout):
    """The pw2 groups (the segments of the Triton and C++ kernels) compute every candidate's
    grouped second 1x1."""
    plan = plan_for(layout)
    O, T = layout.out_channels, layout.total_mid
    w = torch.randn(layout.pw2_numel, dtype=DT)
    h = torch.randn(2, T, 3, 3, dtype=DT)                    # expanded, shuffled order
    ref = torch.cat([F.conv2d(h[:, s.mid_offset:s.mid_offset + s.mid], layout.pw2(w, s),
                              groups=s.spec.groups) for s in layout.slots], 1)
    rows = h.permute(0, 2, 3, 1).reshape(-1, T)
    by_groups = torch.full((rows.shape[0], plan.n_conv * O), float("nan"), dtype=DT)
    for g in plan.pw2_groups:
        wg = w[g.w_offset:g.w_offset + g.out_len * g.in_len].view(g.out_len, g.in_len)
        by_groups[:, g.out_start:g.out_start + g.out_len] = (
            rows[:, g.in_start:g.in_start + g.in_len] @ wg.T)
    ref_rows = ref.permute(0, 2, 3, 1).reshape(rows.shape[0], -1)
    torch.testing.assert_close(by_groups, ref_rows)
    assert plan.pw2_segments == [v for g in plan.pw2_groups for v in g]   # the C++ ops' form


def test_depthwise_runs(layout):
    plan = plan_for(layout)
    w = torch.randn(layout.dw_numel, dtype=DT)
    assert sum(r.channels for r in plan.dw_runs) == layout.total_mid
    assert all(a.kernel != b.kernel for a, b in zip(plan.dw_runs, plan.dw_runs[1:]))
    per_run = torch.cat([v.reshape(-1) for v in dw_weights(w, plan.dw_runs)])
    torch.testing.assert_close(per_run, w)
    for r, v in zip(plan.dw_runs, dw_weights(w, plan.dw_runs)):
        slots = [s for s in layout.slots
                 if r.channel_start <= s.mid_offset < r.channel_start + r.channels]
        assert all(s.spec.kernel == r.kernel for s in slots)
        torch.testing.assert_close(v, torch.cat([layout.dw(w, s)[:, 0] for s in slots]))


def test_mask_columns_and_statistics_sizes(layout):
    plan = plan_for(layout)
    conv = [i for i, c in enumerate(layout.candidates) if c != "skip"]
    skip = [i for i, c in enumerate(layout.candidates) if c == "skip"]
    assert plan.mask_cols == tuple(conv + skip)
    T, O = layout.total_mid, layout.out_channels
    n_skip = O if skip and layout.skip_is_conv else 0
    assert plan.stat_sizes == (T, T, len(conv) * O, n_skip)


@pytest.mark.parametrize("size", [5, 6, 7])
@pytest.mark.parametrize("stride", [1, 2])
def test_geometry_matches_the_convolutions(size, stride):
    L = MixedLayout.build(8, 16, stride, ("k3_e1", "k5_e1"))
    geo = plan_for(L).geometry((2, 8, size, size + 1))
    for k in (1, 3, 5):
        y = F.conv2d(torch.randn(2, 8, size, size + 1, dtype=DT),
                     torch.randn(8, 1, k, k, dtype=DT), stride=stride, padding=k // 2, groups=8)
        assert (geo.ho, geo.wo) == tuple(y.shape[2:])
    assert geo.rows_in == 2 * size * (size + 1) and geo.rows_out == 2 * geo.ho * geo.wo
    rows = torch.randn(geo.rows_out, 5, dtype=DT)
    img = geo.image_out(rows)
    assert img.shape == (2, 5, geo.ho, geo.wo)
    assert img.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(img.permute(0, 2, 3, 1).reshape(-1, 5), rows)


def test_plan_is_cached_per_layout_and_device():
    L = MixedLayout.build(16, 24, 2, CANDIDATES)
    plan = plan_for(L)
    assert plan_for(L.key()) is plan
    assert plan.on("cpu") is plan.on("cpu")
    assert plan.on("cpu").mask_cols.tolist() == list(plan.mask_cols)


def test_skip_only_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="skip-only layer"):
        plan_for(MixedLayout.build(8, 8, 1, ("skip",)))


# --- BatchNorm math against F.batch_norm ------------------------------------------------------

M, C = 37, 6


def _bn_inputs():
    z = torch.randn(M, C, dtype=DT) * 2 + 0.5
    gamma = torch.rand(C, dtype=DT) + 0.5
    beta = torch.randn(C, dtype=DT)
    return z, gamma, beta


def test_coefficients_and_batch_statistics():
    z, gamma, beta = _bn_inputs()
    mean, var = batch_stats(z.sum(0), (z * z).sum(0), M)
    torch.testing.assert_close(mean, z.mean(0))
    torch.testing.assert_close(var, z.var(0, unbiased=False))
    bn = bn_coef(mean, var, gamma, beta)
    torch.testing.assert_close(z * bn.scale + bn.shift,
                               F.batch_norm(z, None, None, gamma, beta, True, 0.0, BN_EPS))
    torch.testing.assert_close(bn.rstd, 1 / torch.sqrt(var + BN_EPS))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_backward_coefficients_equal_autograd(training, relu):
    z, gamma, beta = _bn_inputs()
    rm, rv = torch.randn(C, dtype=DT), torch.rand(C, dtype=DT) + 0.5
    zr, gr, br = (t.clone().requires_grad_() for t in (z, gamma, beta))
    y = F.batch_norm(zr, rm.clone(), rv.clone(), gr, br, training, BN_MOMENTUM, BN_EPS)
    y = torch.relu(y) if relu else y
    dy = torch.randn(M, C, dtype=DT)
    y.backward(dy)
    stats = batch_stats(z.sum(0), (z * z).sum(0), M) if training else (rm, rv)
    bn = bn_coef(*stats, gamma, beta)
    g = torch.where(z * bn.scale + bn.shift > 0, dy, 0) if relu else dy
    c = bn_grad(bn, gamma, g.sum(0), (g * z).sum(0), M, training)
    torch.testing.assert_close(g * c.alpha + z * c.beta + c.delta, zr.grad)
    torch.testing.assert_close(c.dgamma, gr.grad)
    torch.testing.assert_close(c.dbeta, br.grad)
    if not training:
        assert not c.beta.any() and not c.delta.any()


@pytest.mark.parametrize("path", ["cpu_op", "foreach"])
@pytest.mark.parametrize("momentum", [BN_MOMENTUM, 0.3, None])
def test_running_update_equals_batch_norm(path, momentum):
    """Three BNs of different widths and row counts from one packed statistics tensor, two
    steps, against nn.BatchNorm1d in float64 (momentum None: the average over the batches,
    counted in num_batches_tracked); the C++ op and the foreach path other devices take."""
    from fbnet_fast.backends import jit, plan
    if path == "cpu_op" and not jit.load():
        pytest.skip(jit.why_unavailable())
    update = update_running if path == "cpu_op" else plan._update_running_foreach
    g = torch.Generator().manual_seed(5)
    widths, rows = (5, 8, 3), (24, 6, 6)
    bns = [torch.nn.BatchNorm1d(c, momentum=momentum).double() for c in widths]
    mine = [(torch.zeros(c, dtype=DT), torch.ones(c, dtype=DT), torch.zeros((), dtype=torch.long))
            for c in widths]
    for _ in range(2):
        zs = [torch.randn(m, c, dtype=DT, generator=g) * 2 + 1 for c, m in zip(widths, rows)]
        for bn, z in zip(bns, zs):
            bn.train()(z)
        stats = torch.stack([torch.cat([z.mean(0) for z in zs]),
                             torch.cat([z.var(0, unbiased=False) for z in zs])])
        update([t[0] for t in mine], [t[1] for t in mine], stats, list(rows),
               [momentum] * 3, [t[2] for t in mine])
    for bn, (rm, rv, n) in zip(bns, mine):
        torch.testing.assert_close(rm, bn.running_mean)
        torch.testing.assert_close(rv, bn.running_var)
        assert int(n) == int(bn.num_batches_tracked) == 2
    if path == "cpu_op":
        torch.library.opcheck(torch.ops.fbnet_fast.bn_running_update.default, (
            [t[0].clone() for t in mine], [t[1].clone() for t in mine],
            [t[2].clone() for t in mine], stats, list(rows), [0.1, -1.0, 0.5]))
        with pytest.raises(RuntimeError, match=r"bn_running_update: stats must be \[2, 16\]"):
            update([t[0] for t in mine], [t[1] for t in mine], stats[:, 1:], list(rows),
                   [momentum] * 3)
