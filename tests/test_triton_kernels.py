"""The Triton kernels (kernels/*.py) against plain-PyTorch float64 references.

On a machine without CUDA the kernels run in Triton's CPU interpreter. Triton reads
TRITON_INTERPRET when a function is decorated, its own library included, so the variable is
set here before anything imports triton; if triton was imported earlier in compiled mode
the tests skip with that reason. Shapes are small, with real FBNet channel counts.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from fbnet_fast.backends.plan import Segment, plan_for  # noqa: E402
from fbnet_fast.nn.layout import MixedLayout  # noqa: E402
from fbnet_fast.nn.space import CANDIDATES  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float32 if CUDA else torch.float64  # the interpreter runs float64 exactly
TOL = dict(atol=1e-4, rtol=1e-4) if CUDA else dict(atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def K():
    from fbnet_fast.backends.fused_triton import load_kernels, why_unavailable
    why = why_unavailable(DEVICE)
    if why is not None:
        pytest.skip(why)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.backends.cudnn, "allow_tf32", False)   # exact float32 dots on GPU
        yield load_kernels()


def randn(*shape):
    return torch.randn(*shape, dtype=DTYPE, device=DEVICE)


def rand_affine(c):
    return torch.rand(c, dtype=DTYPE, device=DEVICE) + 0.5, 0.5 * randn(c)


def close(a, b):
    torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), **TOL)


# --- pointwise ---------------------------------------------------------------------------

def _second_pointwise_segments(K, c_in=16, c_out=24):
    """The real segments of every candidate's second 1x1 (grouped ones split per group)."""
    layout = MixedLayout.build(c_in, c_out, 2, CANDIDATES)
    return plan_for(layout).pw2_groups, layout


def _segmented_reference(x, w, segments, out_channels):
    y = torch.zeros(x.shape[0], out_channels, dtype=x.dtype, device=x.device)
    for s in segments:
        ws = w[s.w_offset:s.w_offset + s.out_len * s.in_len].view(s.out_len, s.in_len)
        y[:, s.out_start:s.out_start + s.out_len] = x[:, s.in_start:s.in_start + s.in_len] @ ws.T
    return y


@pytest.mark.parametrize("prologue", [False, True])
def test_pointwise_forward_and_stats(K, prologue):
    segments, L = _second_pointwise_segments(K)
    M, cols = 37, len(L.slots) * L.out_channels
    x, w = randn(M, L.total_mid), randn(L.pw2_numel)
    scale, shift = rand_affine(L.total_mid) if prologue else (None, None)
    y, s1, s2 = K.pointwise.pointwise_forward(x, w, segments, cols, scale, shift, stats=True)
    xin = torch.relu(x * scale + shift) if prologue else x
    ref = _segmented_reference(xin, w, segments, cols)
    close(y, ref)
    close(s1, ref.sum(0))
    close(s2, (ref * ref).sum(0))


def test_pointwise_grads(K):
    segments, L = _second_pointwise_segments(K)
    M, cols = 29, len(L.slots) * L.out_channels
    x, w, dy = randn(M, L.total_mid), randn(L.pw2_numel), randn(M, cols)
    scale, shift = rand_affine(L.total_mid)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    _segmented_reference(torch.relu(xr * scale + shift), wr, segments, cols).backward(dy)
    dw = K.pointwise.pointwise_grad_weight(dy, x, segments, w.numel(), scale, shift)
    close(dw, wr.grad)
    xr2 = x.clone().requires_grad_()
    _segmented_reference(xr2, w, segments, cols).backward(dy)
    close(K.pointwise.pointwise_grad_input(dy, w, segments, L.total_mid), xr2.grad)


def test_pointwise_dense_block_diagonal_first_conv(K):
    """The first 1x1 of all candidates as one dense GEMM equals the per-candidate convs
    followed by the channel shuffle."""
    from fbnet_fast.nn.blocks import channel_shuffle
    L = MixedLayout.build(24, 24, 1, CANDIDATES)
    n, h = 2, 3
    x, w = randn(n, 24, h, h), randn(L.pw1_numel)
    dense = plan_for(L).dense_pw1(w)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 24).contiguous()
    y, _, _ = K.pointwise.pointwise_forward(rows, dense, (Segment(0, L.total_mid, 0, 24, 0),),
                                            L.total_mid)
    ref = torch.cat([channel_shuffle(F.conv2d(x, L.pw1(w, s), groups=s.spec.groups),
                                     s.spec.groups) for s in L.slots], 1)
    close(y, ref.permute(0, 2, 3, 1).reshape(-1, L.total_mid))


def test_pointwise_alignment_hint_divides_every_column_and_stride(K):
    """ALIGN (tl.multiple_of on the loaded column offsets and the row strides) must divide
    them all, else the compiled kernel reads the wrong columns; powers of two up to 16."""
    from fbnet_fast.kernels.pointwise import _align, _fwd_tiles
    assert [_align(352, 16), _align(48, 24, 72), _align(12, 184), _align(7, 16), _align(0, 64)] \
        == [16, 8, 4, 1, 16]
    segments, layout = _second_pointwise_segments(K, 24, 32)
    tiles, cols = _fwd_tiles(tuple(segments), 16, False, "cpu")
    align = _align(cols, layout.total_mid, 32)
    assert align == 4 and (tiles[:, :4] % align == 0).all()   # 24-channel groups of 12


def test_pointwise_rejects_bad_input(K):
    Seg = K.pointwise.Segment
    x, w = randn(4, 8), randn(64)
    with pytest.raises(ValueError, match="exceeds"):
        K.pointwise.pointwise_forward(x, w, [Seg(0, 8, 4, 8, 0)], 8)
    with pytest.raises(ValueError, match="overlapping"):
        K.pointwise.pointwise_grad_input(randn(4, 8), w, [Seg(0, 4, 0, 8, 0), Seg(4, 4, 0, 8, 32)], 8)
    with pytest.raises(ValueError, match="contiguous channels"):
        K.pointwise.pointwise_forward(x.t(), w, [Seg(0, 8, 0, 4, 0)], 8)


# --- depthwise ---------------------------------------------------------------------------

def _dw_reference(a, w, runs, stride, scale=None, shift=None):
    h = a if scale is None else torch.relu(a * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    outs = []
    for r in runs:
        wk = w[r.w_offset:r.w_offset + r.channels * r.kernel ** 2]
        outs.append(F.conv2d(h[:, r.channel_start:r.channel_start + r.channels],
                             wk.view(r.channels, 1, r.kernel, r.kernel), stride=stride,
                             padding=r.kernel // 2, groups=r.channels))
    return torch.cat(outs, 1)


def _rows(t):
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).contiguous()


@pytest.mark.parametrize("stride,size", [(1, 5), (2, 5), (2, 6)])
def test_depthwise_forward_backward(K, stride, size):
    Run = K.depthwise.DwRun
    c3, c5 = 24, 40     # a 3x3 run and a 5x5 run, as in a real layer
    runs = [Run(0, c3, 3, 0), Run(c3, c5, 5, c3 * 9)]
    C, n = c3 + c5, 2
    a, w = randn(n, C, size, size), randn(c3 * 9 + c5 * 25)
    scale, shift = rand_affine(C)
    y, s1, s2 = K.depthwise.depthwise_forward(_rows(a), w, n, size, size, stride, runs,
                                              scale, shift, stats=True)
    ar, wr = a.clone().requires_grad_(), w.clone().requires_grad_()
    ref = _dw_reference(ar, wr, runs, stride, scale, shift)
    close(y, _rows(ref.detach()))
    close(s1, _rows(ref.detach()).sum(0))
    close(s2, _rows(ref.detach()).pow(2).sum(0))
    dy = randn(*ref.shape)
    ref.backward(dy)
    dw = K.depthwise.depthwise_grad_weight(_rows(dy), _rows(a), n, size, size, stride, runs,
                                           w.numel(), scale, shift)
    close(dw, wr.grad)
    # grad-input epilogue: g = dL/d(BN output) under the ReLU mask, plus the BN sums
    g, sg, sga = K.depthwise.depthwise_grad_input(_rows(dy), w, n, size, size, stride, runs,
                                                  _rows(a), scale, shift)
    g_ref = _rows(ar.grad / scale.view(1, -1, 1, 1))
    close(g, g_ref)
    close(sg, g_ref.sum(0))
    close(sga, (g_ref * _rows(a)).sum(0))
    # plain grad-input
    hr = a.clone().requires_grad_()
    _dw_reference(hr, w, runs, stride).backward(dy)
    (dx,) = K.depthwise.depthwise_grad_input(_rows(dy), w, n, size, size, stride, runs)
    close(dx, _rows(hr.grad))


def test_depthwise_rejects_bad_input(K):
    Run = K.depthwise.DwRun
    with pytest.raises(ValueError, match="stride"):
        K.depthwise.depthwise_forward(randn(8, 4), randn(36), 2, 2, 2, 3, [Run(0, 4, 3, 0)])
    with pytest.raises(ValueError, match="rows"):
        K.depthwise.depthwise_forward(randn(7, 4), randn(36), 2, 2, 2, 1, [Run(0, 4, 3, 0)])
    with pytest.raises(ValueError, match="odd"):
        K.depthwise.depthwise_forward(randn(8, 4), randn(64), 2, 2, 2, 1, [Run(0, 4, 4, 0)])


# --- combine -------------------------------------------------------------------------------

def _combine_reference(z, scale, shift, mask, n, c, res, skip, mode, ss, sb):
    n_conv = scale.numel() // c
    rows = z.shape[0]
    ex = torch.arange(rows, device=z.device) // (rows // n)
    m = mask[ex] if mask.shape[0] > 1 else mask.expand(rows, -1)
    y = 0
    for i in range(n_conv):
        t = z[:, i * c:(i + 1) * c] * scale[i * c:(i + 1) * c] + shift[i * c:(i + 1) * c]
        if res is not None:
            t = t + res
        y = y + m[:, i:i + 1] * t
    if mode == 1:
        y = y + m[:, -1:] * skip
    if mode == 2:
        y = y + m[:, -1:] * torch.relu(skip * ss + sb)
    return y


@pytest.mark.parametrize("mode,residual,per_example", [
    (0, True, False), (1, True, True), (2, False, True), (2, False, False)])
def test_combine(K, mode, residual, per_example):
    n, hw, c, n_conv = 2, 7, 24, 8
    rows = n * hw
    z = randn(rows, n_conv * c)
    scale, shift = rand_affine(n_conv * c)
    ncol = n_conv + (mode != 0)
    mask = torch.rand(n if per_example else 1, ncol, dtype=DTYPE, device=DEVICE)
    x = randn(rows, c)
    skip = x if mode == 1 else (randn(rows, c) if mode == 2 else None)
    ss, sb = rand_affine(c) if mode == 2 else (None, None)
    res = x if residual else None
    y = K.combine.combine_forward(z, scale, shift, mask, n, hw, c, res=res, skip=skip,
                                  skip_mode=mode, skip_scale=ss, skip_shift=sb)
    zr, mr = z.clone().requires_grad_(), mask.clone().requires_grad_()
    sr = skip.clone().requires_grad_() if mode == 2 else skip
    ref = _combine_reference(zr, scale, shift, mr, n, c, res, sr, mode, ss, sb)
    close(y, ref.detach())
    dy = randn(rows, c)
    ref.backward(dy)
    dm, sg, sgz, sgs, sgss = K.combine.combine_backward(
        dy, z, scale, shift, mask, n, hw, c, res=res, skip=skip, skip_mode=mode,
        skip_scale=ss, skip_shift=sb)
    close(dm if per_example else dm.sum(0, keepdim=True), mr.grad)
    g = zr.grad / scale            # = m_i * dy, column by column
    close(sg, g.sum(0))
    close(sgz, (g * z).sum(0))
    if mode == 2:
        gs = sr.grad / ss          # = m_skip * dy * relu'
        close(sgs, gs.sum(0))
        close(sgss, (gs * skip).sum(0))
    # the elementwise BN-backward pass
    alpha, beta, delta = randn(n_conv * c), randn(n_conv * c), randn(n_conv * c)
    coeffs = (randn(c), randn(c), randn(c)) if mode == 2 else None
    dz, ds = K.combine.combine_grad_inputs(
        dy, z, mask, alpha, beta, delta, n, hw, c, skip=skip if mode == 2 else None,
        skip_scale=ss, skip_shift=sb, skip_coeffs=coeffs)
    close(dz, alpha * g + beta * z + delta)
    if mode == 2:
        close(ds, coeffs[0] * gs + coeffs[1] * skip + coeffs[2])


def test_combine_rejects_bad_mask(K):
    z, scale = randn(8, 16), torch.ones(16, dtype=DTYPE, device=DEVICE)
    with pytest.raises(ValueError, match="mask"):
        K.combine.combine_forward(z, scale, scale, randn(3, 2), 2, 4, 8)


# --- BN + ReLU backward (kernels/bn.py) --------------------------------------------------

@pytest.mark.parametrize("rows,c,strided", [(50, 48, False), (37, 144, True), (9, 24, False)])
def test_bn_relu_backward_in_place(K, rows, c, strided):
    """The ReLU mask with its sums, then dL/dz, both written over the gradient: against
    autograd through relu(z * scale + shift) and the torch formulas (float64)."""
    wide = randn(rows, c + 8)
    grad = wide[:, 3:3 + c] if strided else randn(rows, c)   # rows farther apart than c
    z = randn(rows, c)
    scale, shift = rand_affine(c)
    zr = z.clone().requires_grad_()
    pre = zr * scale + shift
    torch.relu(pre).backward(grad)
    g_ref = zr.grad / scale                          # grad * (pre > 0)
    g = grad.clone() if not strided else grad
    before = wide.clone()
    s1, s2 = K.bn.relu_grad_sums_(g, z, scale, shift)
    close(g, g_ref)
    close(s1, g_ref.sum(0))
    close(s2, (g_ref * z).sum(0))
    if strided:   # the columns outside the view are untouched
        close(wide[:, :3], before[:, :3])
        close(wide[:, 3 + c:], before[:, 3 + c:])
    alpha, beta, delta = randn(c), randn(c), randn(c)
    fresh = K.bn.bn_grad_apply(g, z, alpha, beta, delta)
    close(fresh, g_ref * alpha + z * beta + delta)
    out = K.bn.bn_grad_apply(g, z, alpha, beta, delta, out=g)
    assert out is g
    close(g, g_ref * alpha + z * beta + delta)


def test_bn_backward_rejects_bad_input(K):
    g, z = randn(10, 16), randn(10, 16)
    scale, shift = rand_affine(16)
    with pytest.raises(ValueError, match="per-channel vectors must be contiguous"):
        K.bn.relu_grad_sums_(g, z, scale[:8], shift)
    with pytest.raises(ValueError, match="differ"):
        K.bn.relu_grad_sums_(g, randn(10, 24), scale, shift)
    with pytest.raises(ValueError, match="contiguous channels"):
        K.bn.bn_grad_apply(g.t(), z.t(), scale, shift, shift)
