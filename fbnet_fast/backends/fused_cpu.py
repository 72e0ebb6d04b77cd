"""The fused MixedBlock CPU backend, as the custom op ``fbnet_fast::mixed_block_cpu``
(docs/architecture.md, "The fused plan").

Data stays channels-last, so every 1x1 conv is a plain GEMM on a [pixels, channels] matrix:
one GEMM for all candidates' first 1x1 (grouped ones block-diagonal, the channel shuffle
folded into the row order), one C++ depthwise pass over all expanded channels, one GEMM
per candidate for the second 1x1, and the mask-weighted combine. The backward recomputes
the intermediates from x, so only x, the mask, the weights and the BN batch statistics are
saved. Both ops are registered with fake kernels, so torch.compile and export trace them.
The big intermediates live in per-thread scratch buffers reused across calls (``_Workspace``;
they hold about the largest layer's peak, ``clear_workspace()`` frees them).
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from . import jit
from ..nn.layout import BN_EPS, BN_MOMENTUM, MixedLayout

__all__ = ["mixed_block_forward", "why_unavailable", "layout_key", "clear_workspace"]


def why_unavailable(device: torch.device) -> str | None:
    """None when the C++ kernels load (they are built on first use), else the reason."""
    return jit.why_unavailable()


if jit.load():
    from . import ops as _ops  # noqa: F401  (registers dw_conv's fake kernel and autograd)


# --- the static plan of one layer shape ----------------------------------------------

def layout_key(L: MixedLayout) -> str:
    """The op's layout argument: ``"C_in,C_out,stride:cand1,cand2,..."``."""
    return f"{L.in_channels},{L.out_channels},{L.stride}:{','.join(L.candidates)}"


@dataclass(frozen=True)
class Plan:
    L: MixedLayout
    perm1: Optional[Tensor]   # column r of the expanded tensor is BN1 channel perm1[r]
    idx1: Optional[Tensor]    # pw1_weight element -> position in the dense [T, C_in] matrix
    idx2: Optional[Tensor]    # pw2_weight element -> position in the per-slot dense [C_out, mid]
    dw_runs: tuple            # (channel start, channels, kernel, dw_weight offset): same-K runs
    sizes: tuple              # channels of bn1, bn2, bn3, skip_bn in the packed statistics


@functools.lru_cache(maxsize=None)
def plan(key: str) -> Plan:
    shape, _, names = key.partition(":")
    c_in, c_out, stride = map(int, shape.split(","))
    L = MixedLayout.build(c_in, c_out, stride, tuple(names.split(",")))
    T, C, O = L.total_mid, c_in, c_out
    grouped = any(s.spec.groups > 1 for s in L.slots)
    perm1 = idx1 = idx2 = None
    if grouped:
        perm, i1, i2 = [], [], []
        for sl in L.slots:
            g, mid = sl.spec.groups, sl.mid
            r = torch.arange(mid)
            perm.append(sl.mid_offset + (r % g) * (mid // g) + r // g)
        perm1 = torch.cat(perm)
        rows = torch.empty_like(perm1).index_put_((perm1,), torch.arange(T))
        for sl in L.slots:
            g, mid = sl.spec.groups, sl.mid
            cin_g, mid_g, out_g = C // g, mid // g, O // g
            o = torch.arange(mid)      # pw1: [mid, C/g]; conv channel o is in group o // mid_g
            start = rows[sl.mid_offset + o] * C + (o // mid_g) * cin_g
            i1.append((start[:, None] + torch.arange(cin_g)).flatten())
            o = torch.arange(O)        # pw2: [O, mid/g]; output o is in group o // out_g
            start = O * sl.mid_offset + o * mid + (o // out_g) * mid_g
            i2.append((start[:, None] + torch.arange(mid_g)).flatten())
        idx1, idx2 = torch.cat(i1), torch.cat(i2)
    runs, i = [], 0
    while i < len(L.slots):
        j = i
        while j + 1 < len(L.slots) and L.slots[j + 1].spec.kernel == L.slots[i].spec.kernel:
            j += 1
        a, b = L.slots[i], L.slots[j]
        runs.append((a.mid_offset, b.mid_offset + b.mid - a.mid_offset, a.spec.kernel, a.dw_offset))
        i = j + 1
    n_skip = O if L.skip_is_conv and L.skip_index >= 0 else 0
    return Plan(L, perm1, idx1, idx2, tuple(runs), (T, T, len(L.slots) * O, n_skip))


def _dense(flat: Tensor, idx: Optional[Tensor], numel: int) -> Tensor:
    if idx is None:
        return flat
    return flat.new_zeros(numel).index_put_((idx,), flat)


def _dw_weights(p: Plan, dw: Tensor) -> list:
    return [dw[off:off + c * k * k].view(c, k, k) for _, c, k, off in p.dw_runs]


def _nhwc(t: Tensor) -> Tensor:
    """[N, C, H, W] -> the [N*H*W, C] matrix of its channels-last data (a view when possible)."""
    n, c, h, w = t.shape
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n * h * w, c)


def _nchw(m: Tensor, n: int, h: int, w: int) -> Tensor:
    """The [N*H*W, C] matrix as a channels-last [N, C, H, W] view."""
    return m.view(n, h, w, m.shape[1]).permute(0, 3, 1, 2)


def _stats(m: Tensor, training: bool, rm: Tensor, rv: Tensor):
    return torch.ops.fbnet_fast.channel_stats.default(m) if training else (rm, rv)


def _scale_shift(m: Tensor, scale: Tensor, shift: Tensor, relu: bool = True,
                 out: Optional[Tensor] = None) -> Tensor:
    if out is None:
        return torch.ops.fbnet_fast.scale_shift.default(m, scale, shift, relu)
    torch.ops.fbnet_fast.scale_shift_out.default(m, scale, shift, relu, out)
    return out


def _bn_bwd(grad, z, mean, rstd, gamma, beta, relu, training, out=None):
    if out is None:
        return torch.ops.fbnet_fast.bn_backward.default(grad, z, mean, rstd, gamma, beta, relu,
                                                        training)
    dg, db = torch.ops.fbnet_fast.bn_backward_out.default(grad, z, mean, rstd, gamma, beta, relu,
                                                          training, out)
    return out, dg, db


def _bn_coef(mean, var, gamma, beta):
    rstd = torch.rsqrt(var + BN_EPS)
    scale = gamma * rstd
    return rstd, scale, beta - mean * scale


# --- scratch buffers reused across calls ------------------------------------------------

class _Workspace(threading.local):
    """Scratch matrices reused across calls (one set per thread), one flat buffer per role.

    The intermediates are [N*H*W, 22*C] matrices; allocated fresh they come from mmap and
    every page faults on first touch, which cost as much as the arithmetic. A buffer only
    grows (to the largest layer seen) and never leaves the op: nothing returned to the caller
    or saved for backward is a view of it.
    """

    def __init__(self):
        self.bufs = {}

    def get(self, role: str, shape: tuple, like: Tensor) -> Tensor:
        numel = math.prod(shape)
        key = (role, like.dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < numel:
            self.bufs.pop(key, None)   # free the old one before allocating the larger one
            with torch.inference_mode(False):  # usable in and out of inference mode
                buf = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.bufs[key] = buf
        return buf[:numel].view(shape)


_ws = _Workspace()


def clear_workspace() -> None:
    """Free this thread's scratch buffers (they are kept to be reused by the next call)."""
    _ws.bufs.clear()


# --- shared forward computation -----------------------------------------------------

class _Fwd:
    """Forward intermediates (kept only inside one op call)."""


def _forward(p: Plan, x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb, running,
             training, stats_in=None, keep=False):
    L = p.L
    n, C, h, w = x.shape
    s, O, T = L.stride, L.out_channels, L.total_mid
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    r = _Fwd()
    r.X = X = _nhwc(x)
    W1 = _dense(pw1, p.idx1, T * C).view(T, C)
    if p.perm1 is not None:
        g1, b1 = g1[p.perm1], b1[p.perm1]
    M1, M2 = n * h * w, n * ho * wo
    A = torch.mm(X, W1.t(), out=_ws.get("A", (M1, T), x))
    if stats_in is not None:
        m1, v1 = stats_in["bn1"]
    else:
        rm, rv = running[0], running[1]
        if p.perm1 is not None:
            rm, rv = rm[p.perm1], rv[p.perm1]
        m1, v1 = _stats(A, training, rm, rv)
    r.bn1 = (m1, v1)
    rstd1, sc1, sh1 = _bn_coef(m1, v1, g1, b1)
    H1 = _scale_shift(A, sc1, sh1, out=_ws.get("H1", (M1, T), x) if keep else A)
    Dm = _ws.get("D", (M2, T), x)
    torch.ops.fbnet_fast.dw_conv_out.default(_nchw(H1, n, h, w), _dw_weights(p, dw), s,
                                             _nchw(Dm, n, ho, wo))
    if stats_in is not None:
        m2, v2 = stats_in["bn2"]
    else:
        m2, v2 = _stats(Dm, training, running[2], running[3])
    r.bn2 = (m2, v2)
    rstd2, sc2, sh2 = _bn_coef(m2, v2, g2, b2)
    H2 = _scale_shift(Dm, sc2, sh2, out=_ws.get("H2", (M2, T), x) if keep else Dm)
    W2 = _dense(pw2, p.idx2, O * T)
    k = len(L.slots)
    Z = _ws.get("Z", (M2, k * O), x)           # slot i's output in columns [i*O, (i+1)*O)
    r.W2 = []
    for i, sl in enumerate(L.slots):
        W2i = W2[O * sl.mid_offset:O * (sl.mid_offset + sl.mid)].view(O, sl.mid)
        torch.mm(H2[:, sl.mid_offset:sl.mid_offset + sl.mid], W2i.t(), out=Z[:, i * O:(i + 1) * O])
        r.W2.append(W2i)
    # every slot's BN3 at once: one pass over Z
    r.bn3 = stats_in["bn3"] if stats_in is not None else _stats(Z, training, running[4], running[5])
    r.Z = Z.view(n, ho * wo, k, O)
    r.skip = None
    if L.skip_index >= 0 and L.skip_is_conv:
        Xs = X if s == 1 else _nhwc(x[:, :, ::s, ::s])
        S = Xs @ sw.view(O, C).t()
        st = stats_in["skip"] if stats_in is not None else _stats(S, training, running[6], running[7])
        r.skip = (Xs, S, st)
    if keep:  # the backward needs them; the forward lets them go as soon as it can
        r.A, r.H1, r.D, r.H2 = A, H1, Dm, H2
        r.rstd1, r.g1, r.b1 = rstd1, g1, b1
        r.rstd2 = rstd2
    r.shape = (n, C, h, w, ho, wo)
    return r


def _mask_rows(mask: Tensor, n: int) -> Tensor:
    """Tensor[Nm, K]: one row per batch (Nm = 1) or per example (Nm = N)."""
    return mask.view(1, -1) if mask.dim() == 1 else mask


def _pack(p: Plan, r: _Fwd) -> Tensor:
    m1, v1 = r.bn1
    if p.perm1 is not None:  # back to parameter order
        m1 = torch.empty_like(m1).index_put_((p.perm1,), m1)
        v1 = torch.empty_like(v1).index_put_((p.perm1,), v1)
    means = [m1, r.bn2[0], r.bn3[0]]
    vars_ = [v1, r.bn2[1], r.bn3[1]]
    if r.skip is not None:
        means.append(r.skip[2][0])
        vars_.append(r.skip[2][1])
    return torch.stack([torch.cat(means), torch.cat(vars_)])


def _unpack(p: Plan, stats: Tensor) -> dict:
    T, _, n3, ns = p.sizes
    mean, var = stats[0], stats[1]
    m1, v1 = mean[:T], var[:T]
    if p.perm1 is not None:
        m1, v1 = m1[p.perm1], v1[p.perm1]
    bn3 = (mean[2 * T:2 * T + n3], var[2 * T:2 * T + n3])
    out = {"bn1": (m1, v1), "bn2": (mean[T:2 * T], var[T:2 * T]), "bn3": bn3}
    if ns:
        out["skip"] = (mean[2 * T + n3:], var[2 * T + n3:])
    return out


# --- the ops ----------------------------------------------------------------------------

@torch.library.custom_op("fbnet_fast::mixed_block_cpu", mutates_args=(), device_types="cpu")
def mixed_block_cpu(x: Tensor, mask: Tensor, pw1: Tensor, dw: Tensor, pw2: Tensor,
                    bn1_weight: Tensor, bn1_bias: Tensor, bn2_weight: Tensor, bn2_bias: Tensor,
                    bn3_weight: Tensor, bn3_bias: Tensor, skip_weight: Optional[Tensor],
                    skip_bn_weight: Optional[Tensor], skip_bn_bias: Optional[Tensor],
                    running: List[Tensor], layout: str, training: bool) -> tuple[Tensor, Tensor]:
    """Returns (y Tensor[N, C_out, H', W'] in x's memory format, statistics Tensor[2, S]).

    The statistics are each BN's (mean, biased variance) used: batch statistics in training,
    the running ones in eval; ``running`` holds the running mean/var of bn1, bn2, bn3, skip_bn.
    """
    p = plan(layout)
    L = p.L
    with torch.no_grad():
        r = _forward(p, x, mask, pw1, dw, pw2, bn1_weight, bn1_bias, bn2_weight, bn2_bias,
                     bn3_weight, bn3_bias, skip_weight, skip_bn_weight, skip_bn_bias, running,
                     training)
        n, C, h, w, ho, wo = r.shape
        O = L.out_channels
        mr = _mask_rows(mask, n)                       # [Nm, K]
        nm = mr.shape[0]
        k = len(L.slots)
        _, sc, sh = _bn_coef(*r.bn3, bn3_weight, bn3_bias)
        mk = mr[:, [sl.index for sl in L.slots]].view(nm, 1, k, 1)
        # y = sum_i m_i * (Z_i * sc_i + sh_i) + ...: one scaled copy of Z, one sum over slots
        t = torch.mul(r.Z, mk * sc.view(1, 1, k, O), out=_ws.get("ZT", r.Z.shape, x))
        out = t.sum(2).add_((mk * sh.view(1, 1, k, O)).sum(2))
        res = mr[:, [sl.index for sl in L.slots]].sum(1) if L.residual else None
        if L.skip_index >= 0:
            ms = mr[:, L.skip_index]
            if r.skip is None:
                res = ms if res is None else res + ms
            else:
                _, S, (mean, var) = r.skip
                _, sc, sh = _bn_coef(mean, var, skip_bn_weight, skip_bn_bias)
                out.addcmul_(_scale_shift(S, sc, sh).view(n, ho * wo, O), ms.view(nm, 1, 1))
        if res is not None:
            out.addcmul_(r.X.view(n, h * w, C), res.view(nm, 1, 1))
        y = _nchw(out.view(n * ho * wo, O), n, ho, wo)
        if not x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()
        return y, _pack(p, r)


@torch.library.register_fake("fbnet_fast::mixed_block_cpu")
def _(x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb, running, layout, training):
    p = plan(layout)
    n, _, h, w = x.shape
    s, O = p.L.stride, p.L.out_channels
    torch._check(x.shape[1] == p.L.in_channels, lambda: "mixed_block_cpu: input channels")
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
           else torch.contiguous_format)
    y = x.new_empty(n, O, (h - 1) // s + 1, (w - 1) // s + 1).contiguous(memory_format=fmt)
    return y, x.new_empty(2, sum(p.sizes))


@torch.library.custom_op("fbnet_fast::mixed_block_cpu_backward", mutates_args=(),
                         device_types="cpu")
def mixed_block_cpu_backward(
        grad: Tensor, x: Tensor, mask: Tensor, pw1: Tensor, dw: Tensor, pw2: Tensor,
        bn1_weight: Tensor, bn1_bias: Tensor, bn2_weight: Tensor, bn2_bias: Tensor,
        bn3_weight: Tensor, bn3_bias: Tensor, skip_weight: Optional[Tensor],
        skip_bn_weight: Optional[Tensor], skip_bn_bias: Optional[Tensor], stats: Tensor,
        layout: str, training: bool) -> List[Tensor]:
    """Gradients of ``mixed_block_cpu`` w.r.t. x, mask, pw1, dw, pw2, bn1-3 weight/bias and the
    skip conv (empty tensors when the skip is the identity), recomputing the forward from x."""
    p = plan(layout)
    L = p.L
    with torch.no_grad():
        r = _forward(p, x, mask, pw1, dw, pw2, bn1_weight, bn1_bias, bn2_weight, bn2_bias,
                     bn3_weight, bn3_bias, skip_weight, skip_bn_weight, skip_bn_bias, None,
                     training, stats_in=_unpack(p, stats), keep=True)
        n, C, h, w, ho, wo = r.shape
        O, T, K = L.out_channels, L.total_mid, mask.shape[-1]
        M1, M2 = n * h * w, n * ho * wo
        dY = _nhwc(grad).view(n, ho * wo, O)
        mr = _mask_rows(mask, n)
        nm = mr.shape[0]
        Sdy = dY.sum(1)                                         # [n, O]
        dm = x.new_zeros(n, K)                                  # per example
        dH2 = _ws.get("dH2", (M2, T), x)
        dW2 = x.new_empty(O * T)
        k = len(L.slots)
        # every slot's BN3 backward at once, on [n, pixels, k, O] views
        mean, var = (v.view(k, O) for v in r.bn3)
        g3, b3 = bn3_weight.view(k, O), bn3_bias.view(k, O)
        rstd = torch.rsqrt(var + BN_EPS)
        mk = mr[:, [sl.index for sl in L.slots]].view(nm, 1, k, 1)
        dZ = _ws.get("ZT", r.Z.shape, x)
        dY4 = dY.view(n, ho * wo, 1, O)
        R = (torch.mul(r.Z, dY4, out=dZ).sum(1) - Sdy.view(n, 1, O) * mean) * rstd  # [n, k, O]
        dm[:, [sl.index for sl in L.slots]] = (R * g3).sum(2) + Sdy @ b3.t()
        mk3 = mk.view(nm, k, 1)
        dgam = (mk3 * R).sum(0)                                   # [k, O]
        dbet = (mk3 * Sdy.view(n, 1, O)).sum(0)
        dg3, db3 = [dgam.flatten()], [dbet.flatten()]
        a = (g3 * rstd).view(1, 1, k, O) * mk
        if training:
            c_z = -g3 * rstd * rstd * dgam / M2
            c_0 = -g3 * rstd * (dbet - mean * rstd * dgam) / M2
            torch.mul(r.Z, c_z, out=dZ).add_(c_0).addcmul_(dY4, a)
        else:
            torch.mul(dY4, a, out=dZ)
        dZm = dZ.view(M2, k * O)
        for i, sl in enumerate(L.slots):
            dZi = dZm[:, i * O:(i + 1) * O]
            cols = slice(sl.mid_offset, sl.mid_offset + sl.mid)
            torch.mm(dZi.t(), r.H2[:, cols],
                     out=dW2[O * sl.mid_offset:O * (sl.mid_offset + sl.mid)].view(O, sl.mid))
            torch.mm(dZi, r.W2[i], out=dH2[:, cols])
        dX = None
        res = mr[:, [sl.index for sl in L.slots]].sum(1) if L.residual else None
        dsw, dsg, dsb = (x.new_empty(0) for _ in range(3))
        if L.residual:
            Sx = torch.mul(dY, r.X.view(n, h * w, C), out=_ws.get("dYX", dY.shape, x)).sum((1, 2))
            for sl in L.slots:
                dm[:, sl.index] += Sx
            if L.skip_index >= 0:
                dm[:, L.skip_index] = Sx
                res = res + mr[:, L.skip_index]
        elif r.skip is not None:
            Xs, S, (mean, var) = r.skip
            rstd, sc, sh = _bn_coef(mean, var, skip_bn_weight, skip_bn_bias)
            Ys = _scale_shift(S, sc, sh)
            dm[:, L.skip_index] = (dY * Ys.view(n, ho * wo, O)).sum((1, 2))
            G = (dY * mr[:, L.skip_index].view(nm, 1, 1)).view(M2, O)
            dS, dsg, dsb = _bn_bwd(G, S, mean, rstd, skip_bn_weight, skip_bn_bias, True, training)
            Ws = skip_weight.view(O, C)
            dsw = (dS.t() @ Xs).flatten()
            dXs = dS @ Ws
            if L.stride == 1:
                dX = dXs
            else:
                dX = x.new_zeros(n, h, w, C)
                dX[:, ::L.stride, ::L.stride] = dXs.view(n, ho, wo, C)
                dX = dX.view(M1, C)
        # BN2 + ReLU, depthwise, BN1 + ReLU, first GEMM.
        # (in place: dD over dH2, dA over dH1)
        dD, dg2, db2 = _bn_bwd(dH2, r.D, r.bn2[0], r.rstd2, bn2_weight, bn2_bias, True, training,
                               out=dH2)
        dH1 = _ws.get("dH1", (M1, T), x)
        dws = torch.ops.fbnet_fast.dw_conv_backward_out.default(
            _nchw(dD, n, ho, wo), _nchw(r.H1, n, h, w), _dw_weights(p, dw), L.stride,
            _nchw(dH1, n, h, w))
        dA, dg1, db1 = _bn_bwd(dH1, r.A, r.bn1[0], r.rstd1, r.g1, r.b1, True, training, out=dH1)
        W1 = _dense(pw1, p.idx1, T * C).view(T, C)
        dW1 = (dA.t() @ r.X).flatten()
        dpw1 = dW1 if p.idx1 is None else dW1[p.idx1]
        dX = dA @ W1 if dX is None else torch.addmm(dX, dA, W1)
        if res is not None:
            dX = dX.view(n, h * w, C).addcmul_(dY, res.view(nm, 1, 1)).view(M1, C)
        if p.perm1 is not None:
            dg1 = torch.empty_like(dg1).index_put_((p.perm1,), dg1)
            db1 = torch.empty_like(db1).index_put_((p.perm1,), db1)
        dpw2 = dW2 if p.idx2 is None else dW2[p.idx2]
        dx = _nchw(dX, n, h, w)
        if not x.is_contiguous(memory_format=torch.channels_last):
            dx = dx.contiguous()
        dmask = dm if mask.dim() == 2 else dm.sum(0)
        ddw = torch.cat([g.reshape(-1) for g in dws])
        return [dx, dmask, dpw1, ddw, dpw2, dg1, db1, dg2, db2,
                torch.cat(dg3), torch.cat(db3), dsw, dsg, dsb]


@torch.library.register_fake("fbnet_fast::mixed_block_cpu_backward")
def _(grad, x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb, stats, layout, training):
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
           else torch.contiguous_format)
    skip = [torch.empty_like(t) if t is not None else x.new_empty(0) for t in (sw, sg, sb)]
    return ([torch.empty_like(x, memory_format=fmt)]
            + [torch.empty_like(t) for t in (mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3)] + skip)


def _setup_context(ctx, inputs, output):
    (x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb, running, layout,
     training) = inputs
    ctx.layout, ctx.training, ctx.has_skip = layout, training, sw is not None
    ctx.n_running = len(running)
    skip = (sw, sg, sb) if sw is not None else ()
    ctx.save_for_backward(x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, output[1], *skip)


def _backward(ctx, grad, _grad_stats):
    x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, stats, *skip = ctx.saved_tensors
    sw, sg, sb = skip if ctx.has_skip else (None, None, None)
    grads = torch.ops.fbnet_fast.mixed_block_cpu_backward(
        grad, x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb, stats,
        ctx.layout, ctx.training)
    skip_grads = grads[11:] if ctx.has_skip else [None, None, None]
    return (*grads[:11], *skip_grads, [None] * ctx.n_running, None, None)


torch.library.register_autograd("fbnet_fast::mixed_block_cpu", _backward,
                                setup_context=_setup_context)


# --- the backend entry point --------------------------------------------------------------

_BN_ROLES = ("bn1", "bn2", "bn3", "skip_bn")


def mixed_block_forward(block, x: Tensor, weights: Tensor) -> Tensor:
    """``MixedBlock`` forward on the fused op; updates the BN running statistics in training."""
    L = block.layout
    n, _, h, w = x.shape
    s = L.stride
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    if block.training and min(n * h * w, n * ho * wo) <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    has_skip = block.skip_weight is not None
    roles = _BN_ROLES if has_skip else _BN_ROLES[:3]
    running = [getattr(block, f"{r}_running_{k}") for r in roles for k in ("mean", "var")]
    skip = ((block.skip_weight, block.skip_bn_weight, block.skip_bn_bias) if has_skip
            else (None, None, None))
    y, stats = torch.ops.fbnet_fast.mixed_block_cpu(
        x, weights.to(x.dtype), block.pw1_weight, block.dw_weight, block.pw2_weight,
        block.bn1_weight, block.bn1_bias, block.bn2_weight, block.bn2_bias,
        block.bn3_weight, block.bn3_bias, *skip, running, layout_key(L), block.training)
    if block.training:
        with torch.no_grad():
            counts = (n * h * w, n * ho * wo, n * ho * wo, n * ho * wo)
            off = 0
            for role, count in zip(roles, counts):
                rm = getattr(block, f"{role}_running_mean")
                rv = getattr(block, f"{role}_running_var")
                c = rm.shape[0]
                rm.mul_(1 - BN_MOMENTUM).add_(stats[0, off:off + c], alpha=BN_MOMENTUM)
                rv.mul_(1 - BN_MOMENTUM).add_(stats[1, off:off + c],
                                              alpha=BN_MOMENTUM * count / (count - 1))
                off += c
    return y
