"""The fused MixedBlock CPU backend, as the custom op ``fbnet_fast::mixed_block_cpu``
(docs/architecture.md, "The fused plan").

Data stays channels-last, so every 1x1 conv is a plain GEMM on a [pixels, channels] matrix:
one GEMM for all candidates' first 1x1 (grouped ones block-diagonal, the channel shuffle
folded into the row order; where BN1's statistics come from the input's covariance the
forward runs it per depthwise tile instead, so its output is never written), one C++
depthwise pass over all expanded channels, one C++ op for
every candidate's second 1x1 (``pointwise_bn_out``, csrc/cpu/pointwise.cpp), and the
mask-weighted combine. The BNs take no passes of their own (bench/report.py's ``PASSES``
counts them): BN1's statistics come from the input's [C_in, C_in] covariance, BN1 + ReLU is
the depthwise's prologue and BN2's statistics its epilogue, BN2 + ReLU is the second 1x1's
prologue and BN3's statistics its epilogue. In the backward the second 1x1s leave the
gradient at BN2 (ReLU mask applied) with BN2's sums; the depthwise backward applies BN2's
backward to each tile of it as it loads it (its prologue) and makes the gradient at BN1 one
row at a time and takes BN1's sums and the first 1x1's two products of it from that
row, so it is never written, and BN1's backward is taken apart in [C_in]-sized terms; the
mask-weighted combine and BN3's backward are C++ passes over all candidates' second 1x1
outputs at once. No loop over the candidates runs in Python. The backward recomputes the
intermediates from x, so only x, the mask, the weights and the BN batch statistics are
saved, and in the eager path X's covariance where BN1's statistics came from it; at small
maps the eager path also keeps D, Z and A where the forward writes it (``KEEP_BYTES``).
Both ops are registered with fake kernels, so torch.compile and export trace them; eager calls run the same two implementations through an autograd.Function
(``plan.register_fused_autograd``), without the custom op's dispatch.
The big intermediates live in per-thread scratch buffers reused across calls (``_Workspace``;
they hold about the largest layer's peak, ``clear_workspace()`` frees them).
"""
from __future__ import annotations

import math
import threading
from typing import List, Optional

import torch
from torch import Tensor

from . import jit
from ..nn.layout import BN_EPS
from .plan import (BNCoef, BNGrad, FusedPlan, bn1_stats_via_covariance, call_fused_op,
                   dw_weights, op_impl, plan_for, register_fused_autograd)

__all__ = ["mixed_block_forward", "why_unavailable", "clear_workspace"]


def why_unavailable(device: torch.device) -> str | None:
    """None when the C++ kernels load (they are built on first use), else the reason."""
    return jit.why_unavailable()


if jit.load():
    from . import ops as _ops  # noqa: F401  (registers dw_conv's fake kernel and autograd)


# --- NHWC matrices and the C++ ops -------------------------------------------------------

def nhwc(t: Tensor) -> Tensor:
    """[N, C, H, W] -> the [N*H*W, C] matrix of its channels-last data (a view when possible)."""
    n, c, h, w = t.shape
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n * h * w, c)


def _stats(m: Tensor, training: bool, rm: Tensor, rv: Tensor):
    return torch.ops.fbnet_fast.channel_stats.default(m) if training else (rm, rv)


def _scale_shift(m: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return torch.ops.fbnet_fast.scale_shift.default(m, scale, shift, True)


def _bn_bwd(grad, z, mean, rstd, gamma, beta, training):
    return torch.ops.fbnet_fast.bn_backward.default(grad, z, mean, rstd, gamma, beta, True,
                                                    training)


# plan.py's per-channel steps as one C++ call each (csrc/cpu/per_channel.cpp): as torch ops
# they are 20-40 calls per block call, a fifth of the fixed cost of a small layer.
def bn_coef_cpu(mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor,
                eps: float = BN_EPS) -> BNCoef:
    """``plan.bn_coef``."""
    return BNCoef(mean, var, *torch.ops.fbnet_fast.bn_coef.default(mean, var, gamma, beta, eps))


def _bn_grad(bn: BNCoef, gamma: Tensor, sum_g: Tensor, sum_gz: Tensor, count: int,
             training: bool, centered: bool = False) -> BNGrad:
    """``plan.bn_grad`` computed in float64; ``centered``: sum_gz is sum(g * (z - mean)), as
    the C++ backward kernels take it (no cancellation)."""
    return BNGrad(*torch.ops.fbnet_fast.bn_grad_coef.default(
        sum_g, sum_gz, bn.mean, bn.rstd, gamma, count, training, centered))


def _dense_pw1(p: FusedPlan, pw1: Tensor) -> Tensor:
    """``plan.dense_pw1`` as Tensor[T, C_in]."""
    L = p.layout
    if p.perm is None:
        return pw1.view(L.total_mid, L.in_channels)
    return torch.ops.fbnet_fast.pw1_dense.default(pw1, p.pw1_block_ints, L.total_mid,
                                                  L.in_channels)


def _packed_pw1(p: FusedPlan, dense: Tensor) -> Tensor:
    """``plan.packed_pw1`` of Tensor[T, C_in]."""
    if p.perm is None:
        return dense.flatten()
    return torch.ops.fbnet_fast.pw1_packed.default(dense, p.pw1_block_ints)


# --- scratch buffers reused across calls ------------------------------------------------

class _Workspace(threading.local):
    """Scratch matrices reused across calls (one set per thread), one flat buffer per role.

    The intermediates are [N*H*W, 22*C] matrices; allocated fresh they come from mmap and
    every page faults on first touch, which cost as much as the arithmetic. A buffer only
    grows (to the largest layer seen) and never leaves the op: nothing returned to the caller
    or saved for backward is a view of it. The views handed out are kept per shape too (two
    torch calls fewer each, a dozen times per block call).
    """

    def __init__(self):
        self.bufs = {}
        self.views = {}

    def get(self, role: str, shape: tuple, like: Tensor) -> Tensor:
        key = (role, like.dtype)
        vkey = (key, tuple(shape), torch.is_inference_mode_enabled())
        view = self.views.get(vkey)
        if view is not None:
            return view
        numel = math.prod(shape)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < numel:
            self.bufs.pop(key, None)   # free the old one before allocating the larger one
            self.views = {k: v for k, v in self.views.items() if k[0] != key}
            with torch.inference_mode(False):  # usable in and out of inference mode
                buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.bufs[key] = buf
        view = self.views[vkey] = buf[:numel].view(shape)
        return view


_ws = _Workspace()


def clear_workspace() -> None:
    """Free this thread's scratch buffers and the idle blocks of the pool the kept
    intermediates come from (both are kept to be reused by the next call)."""
    _ws.bufs.clear()
    _ws.views.clear()
    torch.ops.fbnet_fast.release_pool.default(torch.empty(0))


# --- shared forward computation -----------------------------------------------------

class _Fwd:
    """Forward intermediates (kept only inside one op call)."""


TILED_A_MAX_CIN = 32
"""Up to this many input channels the backward makes A = X W1^T one tile at a time (inside
the depthwise backward) instead of one whole GEMM whose result it writes and reads twice:
the tiles cost an extra GEMM, 2 C_in flops per element of A, against 12 bytes of traffic
per element saved; at the measured GEMM rate and bandwidth they break even near 30
(bench/RESULTS.md: C_in 8-24 gain 1-23 % per layer, 32 mixed, 64 and more lose 2-7 %)."""
KEEP_BYTES = 12 << 20
"""The most bytes a training call saves for its backward beyond x, the weights and the
statistics: under it the forward keeps D (the depthwise output) and Z (the second 1x1s'),
and A where it writes A anyway (``_writes_a``), and the backward recomputes at most A
instead of the whole forward. Per byte, D and Z cost the most to recompute. With 12
MiB a whole step saves under an eighth of the reference's bytes at the quick preset's size
and at 224x224 batch 8, whose peak RSS grew 1415 -> 1470 MiB (16 MiB: 1520; 1360 since the
backward makes A per tile); every 7x7 layer at batch 8 keeps. 0 always recomputes
(bench/RESULTS.md)."""


def _writes_a(rows: int, in_channels: int) -> bool:
    """Whether a training forward writes A whole (for BN1's statistics: small maps)."""
    return not bn1_stats_via_covariance(rows, in_channels)


def keeps_intermediates(p: FusedPlan, geo, dtype: torch.dtype) -> bool:
    """Whether a training call keeps D, Z, a conv skip's output and maybe A (``KEEP_BYTES``)."""
    L = p.layout
    cols = L.total_mid + p.n_conv * L.out_channels + L.out_channels * L.skip_is_conv
    size = geo.rows_out * cols + geo.rows_in * L.total_mid * _writes_a(geo.rows_in,
                                                                        L.in_channels)
    return size * torch.finfo(dtype).bits // 8 <= KEEP_BYTES


def _forward(p: FusedPlan, x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb, running,
             training, stats_in=None, keep=False, kept=None, keep_big=False, reuse=None):
    """The forward's intermediates. ``keep``: the backward's call (A, D and W1 stay in r);
    ``kept``: a list to append, for the backward, X's ``channel_cov`` (mean, cross products;
    two Nones unless BN1's statistics came from it) and, with ``keep_big``, D, Z, A (or None
    where A is not written) and the skip conv's output (or None) as tensors of their own
    (from a pool: fresh ones page-fault every step), else four Nones; ``reuse``: those four,
    so the backward recomputes at most A."""
    L = p.layout
    n, C, h, w = x.shape
    geo = p.geometry(x.shape)
    s, O, T = L.stride, L.out_channels, L.total_mid
    ho, wo = geo.ho, geo.wo
    r = _Fwd()
    r.X = X = nhwc(x)
    W1 = _dense_pw1(p, pw1)
    g1, b1 = p.shuffle(g1), p.shuffle(b1)
    M1, M2 = geo.rows_in, geo.rows_out
    k = p.n_conv
    cov = [] if kept is not None else None

    def buf(role, shape):  # what is saved for the backward cannot live in the workspace
        return torch.ops.fbnet_fast.pooled_empty.default(x, shape) if keep_big else _ws.get(
            role, shape, x)

    Dm, Z, A, S = reuse if reuse is not None else (None,) * 4
    # A = X W1^T is written only where it is read whole: by BN1's backward where the map is
    # too small for the covariance route (_pw1_backward), and for BN1's statistics where it
    # is too small for theirs; else the depthwise (forward and backward) makes it one tile
    # at a time from X, and it never reaches memory
    via_cov = bn1_stats_via_covariance(M1, C)
    need_a = ((keep and (C > TILED_A_MAX_CIN or (training and not _grad_via_covariance(X))))
              or (stats_in is None and training and not via_cov))
    if A is None and need_a:
        A = torch.mm(X, W1.t(), out=buf("A", (M1, T)))
    if stats_in is not None:
        m1, v1 = stats_in["bn1"]
    elif training:
        m1, v1 = (_pw_stats(X, W1, cov) if via_cov
                  else torch.ops.fbnet_fast.channel_stats.default(A))
    else:
        m1, v1 = p.shuffle(running[0]), p.shuffle(running[1])
    r.bn1 = bn_coef_cpu(m1, v1, g1, b1)
    if reuse is None:
        # BN1 + ReLU inside the depthwise (its prologue), BN2's statistics from its epilogue
        Dm = buf("D", (M2, T))
        a_in, a_weight = _depthwise_input(geo, X, W1, A)
        m2, v2 = torch.ops.fbnet_fast.dw_conv_bn_out.default(
            a_in, dw_weights(dw, p.dw_runs), s, r.bn1.scale, r.bn1.shift, geo.image_out(Dm),
            a_weight)
    if stats_in is not None:
        m2, v2 = stats_in["bn2"]
    elif not training:
        m2, v2 = running[2], running[3]
    r.bn2 = bn_coef_cpu(m2, v2, g2, b2)
    if reuse is None:
        # BN2 + ReLU as the prologue of all candidates' second 1x1, BN3's statistics its
        # epilogue
        Z = buf("Z", (M2, k * O))           # slot i's output in columns [i*O, (i+1)*O)
        m3, v3 = torch.ops.fbnet_fast.pointwise_bn_out.default(
            Dm, r.bn2.scale, r.bn2.shift, pw2, p.pw2_segments, Z)
    if stats_in is not None:
        r.bn3 = stats_in["bn3"]
    else:
        r.bn3 = (m3, v3) if training else (running[4], running[5])
    r.Z = Z.view(n, ho * wo, k, O)
    r.skip = None
    if L.skip_index >= 0 and L.skip_is_conv:
        Xs = X if s == 1 else nhwc(x[:, :, ::s, ::s])
        S = Xs @ sw.view(O, C).t() if S is None else S
        st = stats_in["skip_bn"] if stats_in is not None else _stats(S, training, running[6], running[7])
        r.skip = (Xs, S, bn_coef_cpu(*st, sg, sb))
    if kept is not None:
        kept.extend([*(cov or (None, None)), *((Dm, Z, A, S) if keep_big else (None,) * 4)])
    if keep:  # the backward needs them; the forward lets them go as soon as it can
        r.A, r.D, r.W1 = A, Dm, W1
        r.g1 = g1
    r.shape, r.geo = (n, C, h, w, ho, wo), geo
    return r


def _unpack_kept(kept) -> tuple:
    """(X's covariance or None, (D, Z, A, S) or None) from what ``_forward`` appended to
    ``kept`` (None or empty: nothing kept)."""
    if not kept:
        return None, None
    return (tuple(kept[:2]) if kept[0] is not None else None,
            kept[2:] if kept[2] is not None else None)


def _depthwise_input(geo, X: Tensor, W1: Tensor, A: Optional[Tensor]) -> tuple:
    """(a, a_weight) for the depthwise ops: A where it was written, else X with W1, from
    which they make A one tile at a time."""
    return (geo.image_in(X), W1) if A is None else (geo.image_in(A), None)


def _grad_via_covariance(X: Tensor) -> bool:
    """Whether BN1's backward terms go through X's covariance (GEMMs of T C_in^2
    multiply-adds) rather than through A (GEMMs of M T C_in): from M > C_in."""
    m, c = X.shape
    return m > c


def _pw_stats(X: Tensor, W1: Tensor, cov_out: Optional[list] = None):
    """BN1's batch statistics of A = X W1^T without a pass over A: mean W1 mean(x), biased
    variance diag(W1 cov(x) W1^T), from the [C_in, C_in] covariance of the input, which
    goes to ``cov_out`` (when given) for the backward's ``_pw1_backward``."""
    cov = torch.ops.fbnet_fast.channel_cov.default(X)
    if cov_out is not None:
        cov_out.extend(cov)
    return torch.ops.fbnet_fast.pw1_bn_stats.default(W1, *cov, X.shape[0])


def _mask_rows(mask: Tensor, n: int) -> Tensor:
    """Tensor[Nm, K]: one row per batch (Nm = 1) or per example (Nm = N)."""
    return mask.view(1, -1) if mask.dim() == 1 else mask


# --- the ops ----------------------------------------------------------------------------

def mixed_block_cpu_impl(
        x: Tensor, mask: Tensor, pw1: Tensor, dw: Tensor, pw2: Tensor, bn1_weight: Tensor,
        bn1_bias: Tensor, bn2_weight: Tensor, bn2_bias: Tensor, bn3_weight: Tensor,
        bn3_bias: Tensor, skip_weight: Optional[Tensor], skip_bn_weight: Optional[Tensor],
        skip_bn_bias: Optional[Tensor], running: List[Tensor], layout: str,
        training: bool, kept: Optional[list] = None) -> tuple[Tensor, Tensor]:
    """Returns (y Tensor[N, C_out, H', W'] in x's memory format, statistics Tensor[2, S]).

    The statistics are each BN's (mean, biased variance) used: batch statistics in training,
    the running ones in eval; ``running`` holds the running mean/var of bn1, bn2, bn3, skip_bn.
    ``kept`` (eager calls that record a backward; not part of the op): a list that gets the
    intermediates the backward should reuse, where ``keeps_intermediates`` says so.
    """
    p = plan_for(layout)
    L = p.layout
    keep_big = (kept is not None and training
                and keeps_intermediates(p, p.geometry(x.shape), x.dtype))
    with torch.no_grad():
        r = _forward(p, x, mask, pw1, dw, pw2, bn1_weight, bn1_bias, bn2_weight, bn2_bias,
                     bn3_weight, bn3_bias, skip_weight, skip_bn_weight, skip_bn_bias, running,
                     training, kept=kept, keep_big=keep_big)
        n, C, h, w, ho, wo = r.shape
        O = L.out_channels
        mr = _mask_rows(mask, n)                       # [Nm, K]
        nm = mr.shape[0]
        conv_cols = p.conv_cols
        # y = sum_i m_i BN3_i(Z_i) + ...: one pass over Z
        out = x.new_empty(n, ho * wo, O)
        torch.ops.fbnet_fast.combine_bn_out.default(r.Z, mr[:, conv_cols], *r.bn3, bn3_weight,
                                                    bn3_bias, BN_EPS, out)
        res = mr[:, conv_cols].sum(1) if L.residual else None
        if L.skip_index >= 0:
            ms = mr[:, L.skip_index]
            if r.skip is None:
                res = ms if res is None else res + ms
            else:
                _, S, bn = r.skip
                out.addcmul_(_scale_shift(S, bn.scale, bn.shift).view(n, ho * wo, O),
                             ms.view(nm, 1, 1))
        if res is not None:
            out.addcmul_(r.X.view(n, h * w, C), res.view(nm, 1, 1))
        y = r.geo.image_out(out.view(n * ho * wo, O))
        if not x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()
        stats = {"bn1": (r.bn1.mean, r.bn1.var), "bn2": (r.bn2.mean, r.bn2.var), "bn3": r.bn3}
        if r.skip is not None:
            stats["skip_bn"] = (r.skip[2].mean, r.skip[2].var)
        return y, p.pack_stats(stats)


mixed_block_cpu = torch.library.custom_op("fbnet_fast::mixed_block_cpu", mutates_args=(),
                                          device_types="cpu")(op_impl(mixed_block_cpu_impl))


@torch.library.register_fake("fbnet_fast::mixed_block_cpu")
def _(x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb, running, layout, training):
    p = plan_for(layout)
    geo = p.geometry(x.shape)
    torch._check(x.shape[1] == p.layout.in_channels, lambda: "mixed_block_cpu: input channels")
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
           else torch.contiguous_format)
    y = x.new_empty(geo.n, p.layout.out_channels, geo.ho, geo.wo).contiguous(memory_format=fmt)
    return y, x.new_empty(2, sum(p.stat_sizes))


def mixed_block_cpu_backward_impl(
        grad: Tensor, x: Tensor, mask: Tensor, pw1: Tensor, dw: Tensor, pw2: Tensor,
        bn1_weight: Tensor, bn1_bias: Tensor, bn2_weight: Tensor, bn2_bias: Tensor,
        bn3_weight: Tensor, bn3_bias: Tensor, skip_weight: Optional[Tensor],
        skip_bn_weight: Optional[Tensor], skip_bn_bias: Optional[Tensor], stats: Tensor,
        layout: str, training: bool, weight_grads: bool = True,
        kept: Optional[list] = None, mask_grad: bool = True) -> List[Tensor]:
    """Gradients of ``mixed_block_cpu`` w.r.t. x, mask, pw1, dw, pw2, bn1-3 weight/bias and the
    skip conv (empty tensors when the skip is the identity), recomputing the forward from x
    unless the forward ``kept`` its intermediates. Without ``weight_grads`` (no weight needs
    one: a θ step) the three convs' weight gradients are skipped and come back empty (a
    quick-size θ step runs 1.19x faster). Without ``mask_grad`` (eager calls whose mask
    needs none: weight steps, discrete models) the skip path's share of the mask's gradient,
    a pass over x or the skip conv's output, is skipped and the mask's comes back empty."""
    p = plan_for(layout)
    L = p.layout
    cov, reuse = _unpack_kept(kept)
    with torch.no_grad():
        r = _forward(p, x, mask, pw1, dw, pw2, bn1_weight, bn1_bias, bn2_weight, bn2_bias,
                     bn3_weight, bn3_bias, skip_weight, skip_bn_weight, skip_bn_bias, None,
                     training, stats_in=p.unpack_stats(stats), keep=True, reuse=reuse)
        n, C, h, w, ho, wo = r.shape
        O, T, K = L.out_channels, L.total_mid, mask.shape[-1]
        M1, M2 = n * h * w, n * ho * wo
        dY = nhwc(grad).view(n, ho * wo, O)
        mr = _mask_rows(mask, n)
        nm = mr.shape[0]
        dm = x.new_zeros(n, K)                                  # per example
        k = p.n_conv
        conv_cols = p.conv_cols
        # every slot's BN3 backward and the mask's gradient at once, two passes over Z
        dZ = _ws.get("ZT", r.Z.shape, x)
        dm[:, conv_cols], dg3, db3 = torch.ops.fbnet_fast.combine_bn_backward_out.default(
            r.Z, dY, mr[:, conv_cols], *r.bn3, bn3_weight, bn3_bias, BN_EPS, training, dZ)
        # the second 1x1s' backward with BN2's ReLU mask and sums as its epilogue: g2 = dL/d(BN2
        # output before the ReLU)
        g2 = _ws.get("dH2", (M2, T), x)
        dpw2, sums2 = torch.ops.fbnet_fast.pointwise_bn_backward_out.default(
            dZ.view(M2, k * O), r.D, r.bn2.scale, r.bn2.shift, r.bn2.mean, pw2, p.pw2_segments,
            g2, weight_grads)
        c2 = _bn_grad(r.bn2, bn2_weight, *sums2.unbind(), M2, training, centered=True)
        dX = None
        res = mr[:, conv_cols].sum(1) if L.residual else None
        dsw, dsg, dsb = (x.new_empty(0) for _ in range(3))
        if L.residual:
            if mask_grad:
                Sx = torch.mul(dY, r.X.view(n, h * w, C),
                               out=_ws.get("dYX", dY.shape, x)).sum((1, 2))
                dm[:, conv_cols] += Sx[:, None]
                if L.skip_index >= 0:
                    dm[:, L.skip_index] = Sx
            if L.skip_index >= 0:
                res = res + mr[:, L.skip_index]
        elif r.skip is not None:
            Xs, S, bn = r.skip
            if mask_grad:
                Ys = _scale_shift(S, bn.scale, bn.shift)
                dm[:, L.skip_index] = (dY * Ys.view(n, ho * wo, O)).sum((1, 2))
            G = (dY * mr[:, L.skip_index].view(nm, 1, 1)).view(M2, O)
            dS, dsg, dsb = _bn_bwd(G, S, bn.mean, bn.rstd, skip_bn_weight, skip_bn_bias, training)
            Ws = skip_weight.view(O, C)
            dsw = (dS.t() @ Xs).flatten() if weight_grads else x.new_empty(0)
            dXs = dS @ Ws
            if L.stride == 1:
                dX = dXs
            else:
                dX = x.new_zeros(n, h, w, C)
                dX[:, ::L.stride, ::L.stride] = dXs.view(n, ho, wo, C)
                dX = dX.view(M1, C)
        # depthwise, BN1 + ReLU, first GEMM
        dg2, db2 = c2.dgamma, c2.dbeta
        # the depthwise backward applies BN2's backward (dD = alpha g2 + beta D + delta) to
        # each tile of rows it reads, makes g = dL/d(BN1 output before the ReLU) one row at a
        # time and takes BN1's two sums and the first 1x1's products of g from that row:
        # neither dD, g nor dA = alpha g + beta A + delta is written (_pw1_backward takes dA
        # apart)
        alpha1 = r.g1 * r.bn1.rstd
        gW = x.new_empty(M1, C)
        a_in, a_weight = _depthwise_input(r.geo, r.X, r.W1, r.A)
        dws, sums1, gX = torch.ops.fbnet_fast.dw_conv_bn_backward_out.default(
            r.geo.image_out(g2), a_in, dw_weights(dw, p.dw_runs), L.stride,
            r.bn1.scale, r.bn1.shift, r.bn1.mean, None, r.X, alpha1[:, None] * r.W1, gW,
            r.geo.image_out(r.D), torch.stack([c2.alpha, c2.beta, c2.delta]), weight_grads,
            a_weight=a_weight)
        c1 = _bn_grad(r.bn1, r.g1, *sums1.unbind(), M1, training, centered=True)
        dW1 = gX.mul_(alpha1[:, None]) if weight_grads else None
        dX = _pw1_backward(dW1, gW, r.X, r.W1, r.A, c1, dX, training, cov=cov)
        dg1, db1 = c1.dgamma, c1.dbeta
        dpw1 = _packed_pw1(p, dW1) if weight_grads else x.new_empty(0)
        if res is not None:
            dX = dX.view(n, h * w, C).addcmul_(dY, res.view(nm, 1, 1)).view(M1, C)
        dg1, db1 = p.unshuffle(dg1), p.unshuffle(db1)
        dx = r.geo.image_in(dX)
        if not x.is_contiguous(memory_format=torch.channels_last):
            dx = dx.contiguous()
        dmask = (dm if mask.dim() == 2 else dm.sum(0)) if mask_grad else x.new_empty(0)
        ddw = torch.cat([t.reshape(-1) for t in dws]) if weight_grads else x.new_empty(0)
        return [dx, dmask, dpw1, ddw, dpw2, dg1, db1, dg2, db2,
                dg3, db3, dsw, dsg, dsb]


def _pw1_backward(dW1: Optional[Tensor], dX: Tensor, X: Tensor, W1: Tensor, A: Tensor,
                  c: BNGrad, dX_skip: Optional[Tensor], training: bool,
                  cov: Optional[tuple] = None) -> Tensor:
    """dX (and dW1 unless it is None: no weight gradients) of A = X W1^T given dA = alpha g +
    beta A + delta per channel, from the two products of g (dW1 = alpha g^T X and dX =
    g (alpha W1), which the depthwise backward takes): dW1 gains (beta A + delta)^T X and dX
    gains (beta A + delta) W1. With many rows these come from the narrow X alone: A = Xc W1^T
    + W1 mean(x) (Xc = X - mean(x)), so beta A + delta = beta Xc W1^T + e with e = delta +
    beta W1 mean(x), and dW1 gains beta W1 Xc^T Xc + e sum(X), dX gains Xc B + e W1 = X B +
    (e W1 - mean(x) B) with B = W1^T (beta W1): one pass over X (``channel_cov``) and
    [C_in]-sized terms, Xc is never made (``pw1_cov_backward``; ``cov``: X's ``channel_cov``
    when the forward kept it). Both are updated in place; ``dX_skip`` (the skip's part) is
    added to dX."""
    if dX_skip is not None:
        dX.add_(dX_skip)
    if training and _grad_via_covariance(X):
        cov = cov or torch.ops.fbnet_fast.channel_cov.default(X)
        torch.ops.fbnet_fast.pw1_cov_backward.default(dX, dW1, X, W1, c.beta, c.delta, *cov)
    elif training:
        if dW1 is not None:
            dW1.addcmul_(c.beta[:, None], A.t() @ X).addr_(c.delta, X.sum(0))
        dX.addmm_(torch.mul(A, c.beta, out=_ws.get("bA", A.shape, A)), W1).add_(c.delta @ W1)
    return dX


mixed_block_cpu_backward = torch.library.custom_op(
    "fbnet_fast::mixed_block_cpu_backward", mutates_args=(),
    device_types="cpu")(op_impl(mixed_block_cpu_backward_impl))


@torch.library.register_fake("fbnet_fast::mixed_block_cpu_backward")
def _(grad, x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb, stats, layout, training,
      weight_grads=True):
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
           else torch.contiguous_format)

    def like(t, conv=False):  # the convs' weight gradients are empty without weight_grads
        keep = t is not None and (weight_grads or not conv)
        return torch.empty_like(t) if keep else x.new_empty(0)

    return ([torch.empty_like(x, memory_format=fmt), like(mask)]
            + [like(t, conv=True) for t in (pw1, dw, pw2)]
            + [like(t) for t in (g1, b1, g2, b2, g3, b3)]
            + [like(sw, conv=True), like(sg), like(sb)])


# the eager path's autograd.Function (plan.run_fused_op), also cpu_layers' for single blocks
mixed_block_eager = register_fused_autograd("mixed_block_cpu", mixed_block_cpu_impl,
                                            mixed_block_cpu_backward_impl, keeps=True)


# --- the backend entry point --------------------------------------------------------------

def mixed_block_forward(block, x: Tensor, weights: Tensor) -> Tensor:
    """``MixedBlock`` forward on the fused op; updates the BN running statistics in training."""
    return call_fused_op(torch.ops.fbnet_fast.mixed_block_cpu, block, x, weights.to(x.dtype),
                         eager=mixed_block_eager)
