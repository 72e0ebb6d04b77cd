"""The Triton MixedBlock backend: fused kernels, recomputation in backward
(docs/architecture.md, "The fused plan").

Forward: one segmented GEMM for every candidate's first 1x1 (BN1 statistics in its
epilogue), one depthwise pass per kernel size (BN1 + ReLU on load, BN2 statistics out),
the second 1x1s as one segmented GEMM (BN2 + ReLU on load, BN3 statistics out), then the
mask-weighted combine. Only x, the mask, the BN statistics and the weights are saved;
backward recomputes the intermediates. Tensors are NHWC rows inside; the output keeps the
input's memory format. CPU tensors run under ``TRITON_INTERPRET=1`` (tests only).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from ..nn.layout import BN_EPS, BN_MOMENTUM, MixedLayout

__all__ = ["mixed_block_forward", "why_unavailable", "load_kernels", "TritonDepthwise"]

_KERNELS = "fbnet_fast.kernels"


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_interpreted() -> bool:
    """Whether Triton's own library functions were decorated for the interpreter: this is
    fixed when ``triton`` is first imported, so TRITON_INTERPRET=1 must be set before."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        return isinstance(tl.standard.zeros, InterpretedFunction)
    except Exception:
        return False


def why_unavailable(device) -> str | None:
    """None when this backend can run on ``device``, else the reason."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except Exception as e:  # not installed, or a broken install
        return f"triton is not importable ({e})"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if not _interpret_requested():
            return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1"
        if not _triton_interpreted():
            return ("TRITON_INTERPRET=1 was set after triton was imported; set it before "
                    "the first import of triton")
        return None
    return f"the triton backend does not run on {device.type} tensors"


def load_kernels():
    """The ``fbnet_fast.kernels`` package, decorated for the current TRITON_INTERPRET mode.

    Installed, it is a subpackage; in a source checkout it is the repository's top-level
    ``kernels/`` folder, loaded under the same name. Triton decides interpreted vs compiled
    when a kernel is decorated, so a package imported in the other mode is imported again.
    """
    mod = sys.modules.get(_KERNELS)
    if mod is not None and mod.INTERPRETED == _interpret_requested():
        return mod
    for name in [n for n in sys.modules if n == _KERNELS or n.startswith(_KERNELS + ".")]:
        del sys.modules[name]
    here = Path(__file__).resolve().parents[1]   # the fbnet_fast package
    if (here / "kernels" / "__init__.py").is_file():
        return importlib.import_module(_KERNELS)
    source = here.parent / "kernels"
    if not (source / "__init__.py").is_file():
        raise ImportError(f"fbnet_fast's Triton kernels are missing: neither {here / 'kernels'} "
                          f"nor {source} exists")
    spec = importlib.util.spec_from_file_location(
        _KERNELS, source / "__init__.py", submodule_search_locations=[str(source)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[_KERNELS] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[_KERNELS]
        raise
    setattr(sys.modules["fbnet_fast"], "kernels", mod)
    return mod


# --- static plan: where every candidate's channels and weights go ---------------------

@dataclass(frozen=True)
class Plan:
    """Per (layout, device): kernel segments and the index maps of the role parameters."""

    pw1_segments: tuple      # one dense [total_mid, C_in] segment
    pw1_index: Tensor        # flat pw1_weight element -> position in the dense matrix
    perm: Tensor             # shuffled channel j <- unshuffled channel perm[j] (BN1 order)
    dw_runs: tuple           # one run per stretch of equal kernel size
    pw2_segments: tuple      # one per (candidate, group)
    skip_segments: tuple
    mask_cols: Tensor        # mask columns: conv candidates, then skip


@lru_cache(maxsize=256)
def _plan(layout: MixedLayout, device: str) -> Plan:
    K = load_kernels()
    seg, run = K.pointwise.Segment, K.depthwise.DwRun
    C, Co, T = layout.in_channels, layout.out_channels, layout.total_mid
    index = torch.empty(layout.pw1_numel, dtype=torch.long)
    perm = torch.empty(T, dtype=torch.long)
    runs, pw2 = [], []
    for s in layout.slots:
        G, mid = s.spec.groups, s.mid
        mid_g, cin_g, out_g = mid // G, C // G, Co // G
        r = torch.arange(mid)
        g, j = r // mid_g, r % mid_g
        dense_row = s.mid_offset + j * G + g             # where the shuffle puts row r
        dense = dense_row[:, None] * C + (g * cin_g)[:, None] + torch.arange(cin_g)[None, :]
        index[s.pw1_offset:s.pw1_offset + mid * cin_g] = dense.flatten()
        perm[dense_row] = s.mid_offset + r
        if runs and runs[-1].kernel == s.spec.kernel:
            last = runs[-1]
            runs[-1] = run(last.channel_start, last.channels + mid, last.kernel, last.w_offset)
        else:
            runs.append(run(s.mid_offset, mid, s.spec.kernel, s.dw_offset))
        for gi in range(G):
            pw2.append(seg(s.out_offset + gi * out_g, out_g, s.mid_offset + gi * mid_g, mid_g,
                           s.pw2_offset + gi * out_g * mid_g))
    cols = [s.index for s in layout.slots] + ([layout.skip_index] if layout.skip_index >= 0 else [])
    return Plan((seg(0, T, 0, C, 0),), index.to(device), perm.to(device), tuple(runs),
                tuple(pw2), (seg(0, Co, 0, C, 0),), torch.tensor(cols, device=device))


# --- BatchNorm as per-channel affine maps ---------------------------------------------

@dataclass
class BNState:
    """One BN's batch (training) or running (eval) statistics, as used by the kernels."""

    mean: Tensor
    invstd: Tensor
    scale: Tensor   # gamma * invstd
    shift: Tensor   # beta - mean * scale
    count: int


def _bn_state(mean, var, gamma, beta, count) -> BNState:
    invstd = torch.rsqrt(var + BN_EPS)
    scale = gamma * invstd
    return BNState(mean, invstd, scale, beta - mean * scale, count)


def _batch_stats(s1: Tensor, s2: Tensor, count: int):
    mean = s1 / count
    return mean, (s2 / count - mean * mean).clamp_min(0)


def _bn_backward(bn: BNState, gamma: Tensor, sum_g: Tensor, sum_gx: Tensor, training: bool):
    """dx = alpha*g + beta*x + delta from sum(g), sum(g*x); also dgamma, dbeta."""
    dgamma = (sum_gx - bn.mean * sum_g) * bn.invstd
    alpha = gamma * bn.invstd
    if not training:
        zero = torch.zeros_like(alpha)
        return alpha, zero, zero, dgamma, sum_g
    mean_gxhat = dgamma / bn.count
    beta = -alpha * bn.invstd * mean_gxhat
    delta = -alpha * sum_g / bn.count - beta * bn.mean
    return alpha, beta, delta, dgamma, sum_g


@torch.no_grad()
def _update_running(block, prefix: str, mean: Tensor, var: Tensor, count: int, index=None):
    rm = getattr(block, f"{prefix}_running_mean")
    rv = getattr(block, f"{prefix}_running_var")
    unbiased = var * (count / (count - 1))
    if index is None:
        rm.mul_(1 - BN_MOMENTUM).add_(mean.to(rm.dtype), alpha=BN_MOMENTUM)
        rv.mul_(1 - BN_MOMENTUM).add_(unbiased.to(rv.dtype), alpha=BN_MOMENTUM)
    else:
        rm[index] = rm[index] * (1 - BN_MOMENTUM) + BN_MOMENTUM * mean.to(rm.dtype)
        rv[index] = rv[index] * (1 - BN_MOMENTUM) + BN_MOMENTUM * unbiased.to(rv.dtype)


# --- depthwise implementations (Triton here; fused_cuda swaps in its CUDA ops) ---------

class TritonDepthwise:
    """The depthwise pass through the Triton kernels (prologue and epilogue fused)."""

    def forward(self, a, w, n, h, wd, stride, runs, scale, shift, stats):
        return load_kernels().depthwise.depthwise_forward(a, w, n, h, wd, stride, runs,
                                                          scale, shift, stats)

    def backward(self, dd, a, w, n, h, wd, stride, runs, scale, shift):
        """(g, sum(g), sum(g*a), dw): g = dL/d(BN output) under the ReLU mask."""
        K = load_kernels().depthwise
        dw = K.depthwise_grad_weight(dd, a, n, h, wd, stride, runs, w.numel(), scale, shift)
        g, s1, s2 = K.depthwise_grad_input(dd, w, n, h, wd, stride, runs, a, scale, shift)
        return g, s1, s2, dw


# --- the pass shared by forward and the backward's recomputation ------------------------

def _rows(t: Tensor) -> Tensor:
    """Tensor[N, C, H, W] (any layout) -> NHWC rows Tensor[N*H*W, C], contiguous."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c).contiguous()


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclass
class _Pass:
    X: Tensor
    Xs: Tensor          # X at the strided positions (the skip conv's input)
    W1: Tensor          # dense [total_mid * C_in] first pointwise, shuffle folded in
    A: Tensor
    D: Tensor
    Z: Tensor
    S: Tensor | None


class _Shapes:
    def __init__(self, block, x: Tensor):
        self.n, _, self.h, self.w = x.shape
        s = block.stride
        self.ho, self.wo = (self.h + s - 1) // s, (self.w + s - 1) // s
        self.m, self.mo = self.n * self.h * self.w, self.n * self.ho * self.wo


def _run_pass(block, plan: Plan, dw_impl, x, params, cdt, sh: _Shapes, bns, training_stats):
    """Compute A, D, Z (and S). With ``training_stats`` the BN states are derived from the
    epilogues' sums and appended to ``bns``; otherwise ``bns`` holds them already."""
    K = load_kernels()
    L = block.layout
    pw1, dww, pw2, skw = (p.to(cdt) if p is not None else None for p in params)
    X = _rows(x).to(cdt)
    W1 = torch.zeros(L.total_mid * L.in_channels, dtype=cdt, device=x.device)
    W1[plan.pw1_index] = pw1
    A, s1, s2 = K.pointwise.pointwise_forward(X, W1, plan.pw1_segments, L.total_mid,
                                              stats=training_stats)
    g1 = block.bn1_weight[plan.perm]
    b1 = block.bn1_bias[plan.perm]
    if training_stats:
        bns["bn1"] = _bn_state(*_batch_stats(s1, s2, sh.m), g1.to(s1.dtype), b1.to(s1.dtype), sh.m)
    bn1 = bns["bn1"]
    D, s1, s2 = dw_impl.forward(A, dww, sh.n, sh.h, sh.w, block.stride, plan.dw_runs,
                                bn1.scale, bn1.shift, training_stats)
    if training_stats:
        bns["bn2"] = _bn_state(*_batch_stats(s1, s2, sh.mo), block.bn2_weight.to(s1.dtype),
                               block.bn2_bias.to(s1.dtype), sh.mo)
    bn2 = bns["bn2"]
    Z, s1, s2 = K.pointwise.pointwise_forward(D, pw2, plan.pw2_segments,
                                              len(L.slots) * L.out_channels,
                                              bn2.scale, bn2.shift, training_stats)
    if training_stats:
        bns["bn3"] = _bn_state(*_batch_stats(s1, s2, sh.mo), block.bn3_weight.to(s1.dtype),
                               block.bn3_bias.to(s1.dtype), sh.mo)
    Xs, S = X, None
    if block.stride != 1:
        Xs = X.view(sh.n, sh.h, sh.w, -1)[:, ::block.stride, ::block.stride].reshape(sh.mo, -1)
        Xs = Xs.contiguous()
    if skw is not None:
        S, s1, s2 = K.pointwise.pointwise_forward(Xs, skw, plan.skip_segments, L.out_channels,
                                                  stats=training_stats)
        if training_stats:
            bns["skip"] = _bn_state(*_batch_stats(s1, s2, sh.mo),
                                    block.skip_bn_weight.to(s1.dtype),
                                    block.skip_bn_bias.to(s1.dtype), sh.mo)
    return _Pass(X, Xs, W1, A, D, Z, S)


def _eval_states(block, plan: Plan, acc: torch.dtype, sh: _Shapes) -> dict:
    def st(prefix, idx=None, count=1):
        rm = getattr(block, f"{prefix}_running_mean").to(acc)
        rv = getattr(block, f"{prefix}_running_var").to(acc)
        g = getattr(block, f"{prefix}_weight").to(acc)
        b = getattr(block, f"{prefix}_bias").to(acc)
        if idx is not None:
            rm, rv, g, b = rm[idx], rv[idx], g[idx], b[idx]
        return _bn_state(rm, rv, g, b, count)
    out = {"bn1": st("bn1", plan.perm), "bn2": st("bn2"), "bn3": st("bn3")}
    if block.skip_weight is not None:
        out["skip"] = st("skip_bn")
    return out


def _skip_mode(block):
    K = load_kernels().combine
    L = block.layout
    if L.skip_index < 0:
        return K.SKIP_NONE
    return K.SKIP_CONV if L.skip_is_conv else K.SKIP_IDENTITY


def _to_format(rows: Tensor, n, h, w, like: Tensor) -> Tensor:
    out = rows.view(n, h, w, -1).permute(0, 3, 1, 2)
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return out if channels_last else out.contiguous()


class _MixedBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, dw_impl, x, weights, pw1, dww, pw2, skw,
                g1, b1, g2, b2, g3, b3, gs, bs):
        L = block.layout
        plan = _plan(L, str(x.device))
        sh = _Shapes(block, x)
        cdt = _compute_dtype(x)
        acc = load_kernels().utils.acc_dtype(cdt)
        training = block.training
        if training and sh.mo <= 1:
            raise ValueError("MixedBlock in training mode needs more than one value per "
                             f"channel for BatchNorm, got input {tuple(x.shape)}")
        bns = {} if training else _eval_states(block, plan, acc, sh)
        p = _run_pass(block, plan, dw_impl, x, (pw1, dww, pw2, skw), cdt, sh, bns, training)
        if training:
            b = bns["bn1"]
            _update_running(block, "bn1", b.mean, 1 / b.invstd ** 2 - BN_EPS, sh.m, plan.perm)
            for name, prefix in (("bn2", "bn2"), ("bn3", "bn3"), ("skip", "skip_bn")):
                if name in bns:
                    b = bns[name]
                    _update_running(block, prefix, b.mean, 1 / b.invstd ** 2 - BN_EPS, b.count)
        mask = weights[..., plan.mask_cols].reshape(-1, len(plan.mask_cols)).to(acc).contiguous()
        mode = _skip_mode(block)
        y = load_kernels().combine.combine_forward(
            p.Z, bns["bn3"].scale, bns["bn3"].shift, mask, sh.n, sh.ho * sh.wo, L.out_channels,
            res=p.X if L.residual else None,
            skip=p.X if mode == 1 else p.S, skip_mode=mode,
            skip_scale=bns["skip"].scale if p.S is not None else None,
            skip_shift=bns["skip"].shift if p.S is not None else None)
        ctx.block, ctx.dw_impl, ctx.bns, ctx.training, ctx.cdt = block, dw_impl, bns, training, cdt
        ctx.per_example = weights.dim() == 2
        ctx.save_for_backward(x, weights, pw1, dww, pw2, skw)
        return _to_format(y, sh.n, sh.ho, sh.wo, x)

    @staticmethod
    def backward(ctx, dy):
        x, weights, pw1, dww, pw2, skw = ctx.saved_tensors
        return (None, None) + _backward(ctx, dy, x, weights, pw1, dww, pw2, skw)


def _backward(ctx, dy, x, weights, pw1, dww, pw2, skw):
    K = load_kernels()
    block, bns, training, cdt = ctx.block, ctx.bns, ctx.training, ctx.cdt
    L = block.layout
    plan = _plan(L, str(x.device))
    sh = _Shapes(block, x)
    p = _run_pass(block, plan, ctx.dw_impl, x, (pw1, dww, pw2, skw), cdt, sh, bns, False)
    acc = bns["bn3"].scale.dtype
    mask = weights[..., plan.mask_cols].reshape(-1, len(plan.mask_cols)).to(acc).contiguous()
    mode = _skip_mode(block)
    hw = sh.ho * sh.wo
    dY = _rows(dy).to(cdt)
    bn3, bnS = bns["bn3"], bns.get("skip")
    dm, sg, sgz, sgs, sgss = K.combine.combine_backward(
        dY, p.Z, bn3.scale, bn3.shift, mask, sh.n, hw, L.out_channels,
        res=p.X if L.residual else None, skip=p.X if mode == 1 else p.S, skip_mode=mode,
        skip_scale=bnS.scale if p.S is not None else None,
        skip_shift=bnS.shift if p.S is not None else None)
    a3, be3, d3, dg3, db3 = _bn_backward(bn3, bn3.scale / bn3.invstd, sg, sgz, training)
    skip_coeffs, dgs = None, None
    if p.S is not None:
        aS, beS, dS_, dgs, dbs = _bn_backward(bnS, bnS.scale / bnS.invstd, sgs, sgss, training)
        skip_coeffs = (aS, beS, dS_)
    dZ, dS = K.combine.combine_grad_inputs(
        dY, p.Z, mask, a3, be3, d3, sh.n, hw, L.out_channels, skip=p.S,
        skip_scale=bnS.scale if p.S is not None else None,
        skip_shift=bnS.shift if p.S is not None else None, skip_coeffs=skip_coeffs)
    # second pointwise
    bn2 = bns["bn2"]
    pw2c = pw2.to(cdt)
    dpw2 = K.pointwise.pointwise_grad_weight(dZ, p.D, plan.pw2_segments, pw2.numel(),
                                             bn2.scale, bn2.shift)
    dH2 = K.pointwise.pointwise_grad_input(dZ, pw2c, plan.pw2_segments, L.total_mid,
                                           out_dtype=acc)
    Dacc = p.D.to(acc)
    g2 = torch.where(Dacc * bn2.scale + bn2.shift > 0, dH2, 0)
    a2, be2, d2, dg2, db2 = _bn_backward(bn2, bn2.scale / bn2.invstd, g2.sum(0),
                                         (g2 * Dacc).sum(0), training)
    dD = (g2 * a2 + Dacc * be2 + d2).to(cdt)
    del g2, dH2, Dacc
    # depthwise
    bn1 = bns["bn1"]
    g1, sg1, sg1a, ddw = ctx.dw_impl.backward(dD, p.A, dww.to(cdt), sh.n, sh.h, sh.w,
                                              block.stride, plan.dw_runs, bn1.scale, bn1.shift)
    a1, be1, d1, dg1, db1 = _bn_backward(bn1, bn1.scale / bn1.invstd, sg1, sg1a, training)
    dA = (g1.to(acc) * a1 + p.A.to(acc) * be1 + d1).to(cdt)
    del g1, dD
    # first pointwise (+ skip conv, residual, identity skip)
    dW1 = K.pointwise.pointwise_grad_weight(dA, p.X, plan.pw1_segments, p.W1.numel())
    dpw1 = dW1[plan.pw1_index]
    dX = K.pointwise.pointwise_grad_input(dA, p.W1, plan.pw1_segments, L.in_channels,
                                          out_dtype=acc)
    dskw = None
    if p.S is not None:
        dskw = K.pointwise.pointwise_grad_weight(dS, p.Xs, plan.skip_segments, skw.numel())
        dXs = K.pointwise.pointwise_grad_input(dS, skw.to(cdt), plan.skip_segments,
                                               L.in_channels, out_dtype=acc)
        view = dX.view(sh.n, sh.h, sh.w, -1)[:, ::block.stride, ::block.stride]
        view += dXs.view(sh.n, sh.ho, sh.wo, -1)
    ex = mask.shape[0]
    if L.residual or mode == 1:
        dYa = dY.to(acc).view(sh.n, hw, -1)
        coef = torch.zeros(ex, dtype=acc, device=x.device)
        if L.residual:
            coef = coef + mask[:, :len(L.slots)].sum(1)
        if mode == 1:
            coef = coef + mask[:, -1]
        dX += (dYa * coef.view(-1, 1, 1)).view(sh.mo, -1)
    dmask = torch.zeros_like(weights)
    dm = dm if ctx.per_example else dm.sum(0)
    dmask[..., plan.mask_cols] = dm.to(weights.dtype)
    # BN1 parameters are stored unshuffled: undo the permutation
    dg1u, db1u = torch.empty_like(dg1), torch.empty_like(db1)
    dg1u[plan.perm], db1u[plan.perm] = dg1, db1
    f = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    has_skip_bn = p.S is not None
    return (_to_format(dX, sh.n, sh.h, sh.w, x).to(x.dtype), dmask,
            f(dpw1, pw1), f(ddw, dww), f(dpw2, pw2), f(dskw, skw) if skw is not None else None,
            f(dg1u, block.bn1_weight), f(db1u, block.bn1_bias),
            f(dg2, block.bn2_weight), f(db2, block.bn2_bias),
            f(dg3, block.bn3_weight), f(db3, block.bn3_bias),
            f(dgs, block.skip_bn_weight) if has_skip_bn else None,
            f(dbs, block.skip_bn_bias) if has_skip_bn else None)


def mixed_block_forward(block, x: Tensor, weights: Tensor, depthwise=None) -> Tensor:
    """y = sum_i w_i * block_i(x) with the fused kernels (see the module docstring).

    x (Tensor[N, C_in, H, W], NCHW or channels_last), weights (Tensor[K] or Tensor[N, K]);
    returns Tensor[N, C_out, H', W'] in x's memory format. ``depthwise`` replaces the
    depthwise implementation (the CUDA backend passes its own)."""
    if block.layout.slots == ():
        raise ValueError("the triton backend needs at least one conv candidate; "
                         "use the reference backend for a skip-only layer")
    skip_bn = block.skip_weight is not None
    return _MixedBlockFunction.apply(
        block, depthwise or TritonDepthwise(), x, weights, block.pw1_weight, block.dw_weight,
        block.pw2_weight, block.skip_weight, block.bn1_weight, block.bn1_bias,
        block.bn2_weight, block.bn2_bias, block.bn3_weight, block.bn3_bias,
        block.skip_bn_weight if skip_bn else None, block.skip_bn_bias if skip_bn else None)
