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
from pathlib import Path
from typing import Optional, Protocol

import torch
from torch import Tensor

from .plan import (BNCoef, FusedPlan, Geometry, Segment, apply_bn_grad, batch_stats, bn_coef,
                   bn_grad, plan_for, relu_grad_sums, update_running)

__all__ = ["mixed_block_forward", "why_unavailable", "load_kernels", "DepthwiseStep",
           "TritonDepthwise"]

_KERNELS = "fbnet_fast.kernels"


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_interpreted() -> bool:
    """Whether Triton's own library functions were decorated for the interpreter: this is
    fixed when ``triton`` is first imported, so TRITON_INTERPRET=1 must be set before."""
    try:  # deferred: importing triton fixes its mode, and the package runs without it
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        return isinstance(tl.standard.zeros, InterpretedFunction)
    except Exception:
        return False


def why_unavailable(device) -> str | None:
    """None when this backend can run on ``device``, else the reason."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401  (deferred: optional, and importing it fixes its mode)
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


# --- the depthwise step: a declared interface (Triton here, CUDA ops in fused_cuda) ------

class DepthwiseStep(Protocol):
    """The pipeline's depthwise pass with BN1 + ReLU before it, on NHWC rows.

    ``a`` (Tensor[N*H*W, T], compute dtype) is BN1's input (the first 1x1's output), ``w``
    the flat dw_weight in the compute dtype, ``geo`` the shapes and the plan's depthwise
    runs, ``bn1`` BN1's per-channel scale and shift (accumulator dtype)."""

    def forward(self, a: Tensor, w: Tensor, geo: Geometry, bn1: BNCoef,
                stats: bool) -> tuple:
        """(d, sum, sumsq): d = depthwise(relu(a * scale + shift)) (Tensor[N*H'*W', T], a's
        dtype) and, with ``stats``, its per-channel sum and sum of squares in the
        accumulator dtype (BN2's batch statistics); None, None without."""
        ...

    def backward(self, dd: Tensor, a: Tensor, w: Tensor, geo: Geometry, bn1: BNCoef) -> tuple:
        """(g, sum(g), sum(g * a), dw) from dd = dL/dd (Tensor[N*H'*W', T]): g (a's shape and
        dtype) = dL/d(a * scale + shift) through the ReLU, its per-channel sums (accumulator
        dtype) as ``bn_grad`` takes them, and dw the flat weight gradient (accumulator dtype)."""
        ...


class TritonDepthwise(DepthwiseStep):
    """The depthwise step on the Triton kernels (BN1 + ReLU and the sums fused in)."""

    def forward(self, a, w, geo: Geometry, bn1: BNCoef, stats: bool):
        return load_kernels().depthwise.depthwise_forward(
            a, w, geo.n, geo.h, geo.w, geo.stride, geo.runs, bn1.scale, bn1.shift, stats)

    def backward(self, dd, a, w, geo: Geometry, bn1: BNCoef):
        K = load_kernels().depthwise
        shape = (geo.n, geo.h, geo.w, geo.stride, geo.runs)
        dw = K.depthwise_grad_weight(dd, a, *shape, w.numel(), bn1.scale, bn1.shift)
        g, s1, s2 = K.depthwise_grad_input(dd, w, *shape, a, bn1.scale, bn1.shift)
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


def _dense_gemm(out_channels: int, in_channels: int) -> tuple:
    """The segments of one dense [out, in] weight: the first 1x1 (shuffle folded in), the skip."""
    return (Segment(0, out_channels, 0, in_channels, 0),)


def _bn_prefixes(block) -> tuple:
    return ("bn1", "bn2", "bn3") + (("skip_bn",) if block.skip_weight is not None else ())


def _affine(block, plan: FusedPlan, acc: torch.dtype) -> dict:
    """Each BN's (gamma, beta) in the accumulator dtype; BN1's in expanded-column order."""
    out = {}
    for prefix in _bn_prefixes(block):
        g, b = (getattr(block, f"{prefix}_{k}").to(acc) for k in ("weight", "bias"))
        out[prefix] = (plan.shuffle(g), plan.shuffle(b)) if prefix == "bn1" else (g, b)
    return out


def _running_states(block, plan: FusedPlan, affine: dict) -> dict:
    """Eval mode: each BN from its running statistics."""
    out = {}
    for prefix, (g, b) in affine.items():
        rm, rv = (getattr(block, f"{prefix}_running_{k}").to(g.dtype) for k in ("mean", "var"))
        if prefix == "bn1":
            rm, rv = plan.shuffle(rm), plan.shuffle(rv)
        out[prefix] = bn_coef(rm, rv, g, b)
    return out


@dataclass
class _Pass:
    X: Tensor
    Xs: Tensor          # X at the strided positions (the skip conv's input)
    W1: Tensor          # dense [total_mid * C_in] first pointwise, shuffle folded in
    A: Tensor
    D: Tensor
    Z: Tensor
    S: Optional[Tensor]


def _run_pass(block, plan: FusedPlan, dw_impl: DepthwiseStep, x, params, cdt, geo: Geometry,
              affine: dict, bns: dict, training_stats: bool) -> _Pass:
    """Compute A, D, Z (and S). With ``training_stats`` the BNs come from the epilogues'
    sums and are stored in ``bns``; otherwise ``bns`` holds them already."""
    K = load_kernels()
    L = block.layout
    pw1, dww, pw2, skw = (p.to(cdt) if p is not None else None for p in params)

    def bn(prefix, s1, s2, count):
        if training_stats:
            bns[prefix] = bn_coef(*batch_stats(s1, s2, count), *affine[prefix])
        return bns[prefix]

    X = _rows(x).to(cdt)
    W1 = plan.dense_pw1(pw1)
    A, s1, s2 = K.pointwise.pointwise_forward(
        X, W1, _dense_gemm(L.total_mid, L.in_channels), L.total_mid, stats=training_stats)
    bn1 = bn("bn1", s1, s2, geo.rows_in)
    D, s1, s2 = dw_impl.forward(A, dww, geo, bn1, training_stats)
    bn2 = bn("bn2", s1, s2, geo.rows_out)
    Z, s1, s2 = K.pointwise.pointwise_forward(D, pw2, plan.pw2_groups, plan.n_conv * L.out_channels,
                                              bn2.scale, bn2.shift, training_stats)
    bn("bn3", s1, s2, geo.rows_out)
    Xs, S = X, None
    if block.stride != 1:
        Xs = X.view(geo.n, geo.h, geo.w, -1)[:, ::block.stride, ::block.stride]
        Xs = Xs.reshape(geo.rows_out, -1).contiguous()
    if skw is not None:
        S, s1, s2 = K.pointwise.pointwise_forward(
            Xs, skw, _dense_gemm(L.out_channels, L.in_channels), L.out_channels,
            stats=training_stats)
        bn("skip_bn", s1, s2, geo.rows_out)
    return _Pass(X, Xs, W1, A, D, Z, S)


def _skip_mode(block):
    K = load_kernels().combine
    L = block.layout
    if L.skip_index < 0:
        return K.SKIP_NONE
    return K.SKIP_CONV if L.skip_is_conv else K.SKIP_IDENTITY


def _mask(plan: FusedPlan, weights: Tensor, acc: torch.dtype) -> Tensor:
    """The mask columns the combine reads (conv candidates, then skip) as Tensor[1 or N, k]."""
    cols = plan.on(weights.device).mask_cols
    return weights[..., cols].reshape(-1, len(plan.mask_cols)).to(acc).contiguous()


def _to_format(out: Tensor, like: Tensor) -> Tensor:
    """An NHWC image view in ``like``'s memory format."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return out if channels_last else out.contiguous()


class _MixedBlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, dw_impl, x, weights, pw1, dww, pw2, skw,
                g1, b1, g2, b2, g3, b3, gs, bs):
        L = block.layout
        plan = plan_for(L)
        geo = plan.geometry(x.shape)
        cdt = _compute_dtype(x)
        acc = load_kernels().utils.acc_dtype(cdt)
        training = block.training
        if training and geo.rows_out <= 1:
            raise ValueError("MixedBlock in training mode needs more than one value per "
                             f"channel for BatchNorm, got input {tuple(x.shape)}")
        affine = _affine(block, plan, acc)
        bns = {} if training else _running_states(block, plan, affine)
        p = _run_pass(block, plan, dw_impl, x, (pw1, dww, pw2, skw), cdt, geo, affine, bns,
                      training)
        if training:
            for prefix, bn in bns.items():
                mean, var, count = bn.mean, bn.var, geo.rows_out
                if prefix == "bn1":   # back to stored order
                    mean, var, count = plan.unshuffle(mean), plan.unshuffle(var), geo.rows_in
                update_running(getattr(block, f"{prefix}_running_mean"),
                               getattr(block, f"{prefix}_running_var"), mean, var, count)
        mode = _skip_mode(block)
        bnS = bns.get("skip_bn")
        y = load_kernels().combine.combine_forward(
            p.Z, bns["bn3"].scale, bns["bn3"].shift, _mask(plan, weights, acc), geo.n,
            geo.ho * geo.wo, L.out_channels, res=p.X if L.residual else None,
            skip=p.X if mode == 1 else p.S, skip_mode=mode,
            skip_scale=bnS.scale if p.S is not None else None,
            skip_shift=bnS.shift if p.S is not None else None)
        ctx.block, ctx.dw_impl, ctx.training, ctx.cdt = block, dw_impl, training, cdt
        ctx.affine, ctx.bns = affine, bns
        ctx.per_example = weights.dim() == 2
        ctx.save_for_backward(x, weights, pw1, dww, pw2, skw)
        return _to_format(geo.image_out(y), x)

    @staticmethod
    def backward(ctx, dy):
        x, weights, pw1, dww, pw2, skw = ctx.saved_tensors
        return (None, None) + _backward(ctx, dy, x, weights, pw1, dww, pw2, skw)


def _backward(ctx, dy, x, weights, pw1, dww, pw2, skw):
    K = load_kernels()
    block, affine, bns, training, cdt = ctx.block, ctx.affine, ctx.bns, ctx.training, ctx.cdt
    L = block.layout
    plan = plan_for(L)
    geo = plan.geometry(x.shape)
    p = _run_pass(block, plan, ctx.dw_impl, x, (pw1, dww, pw2, skw), cdt, geo, affine, bns,
                  False)
    acc = bns["bn3"].scale.dtype
    mask = _mask(plan, weights, acc)
    mode = _skip_mode(block)
    hw = geo.ho * geo.wo
    dY = _rows(dy).to(cdt)
    bn3, bnS = bns["bn3"], bns.get("skip_bn")
    dm, sg, sgz, sgs, sgss = K.combine.combine_backward(
        dY, p.Z, bn3.scale, bn3.shift, mask, geo.n, hw, L.out_channels,
        res=p.X if L.residual else None, skip=p.X if mode == 1 else p.S, skip_mode=mode,
        skip_scale=bnS.scale if p.S is not None else None,
        skip_shift=bnS.shift if p.S is not None else None)
    c3 = bn_grad(bn3, affine["bn3"][0], sg, sgz, geo.rows_out, training)
    cS = None
    if p.S is not None:
        cS = bn_grad(bnS, affine["skip_bn"][0], sgs, sgss, geo.rows_out, training)
    dZ, dS = K.combine.combine_grad_inputs(
        dY, p.Z, mask, c3.alpha, c3.beta, c3.delta, geo.n, hw, L.out_channels, skip=p.S,
        skip_scale=bnS.scale if p.S is not None else None,
        skip_shift=bnS.shift if p.S is not None else None,
        skip_coeffs=cS[:3] if cS is not None else None)
    # second pointwise, BN2 + ReLU
    bn2 = bns["bn2"]
    dpw2 = K.pointwise.pointwise_grad_weight(dZ, p.D, plan.pw2_groups, pw2.numel(),
                                             bn2.scale, bn2.shift)
    dH2 = K.pointwise.pointwise_grad_input(dZ, pw2.to(cdt), plan.pw2_groups, L.total_mid,
                                           out_dtype=acc)
    Dacc = p.D.to(acc)
    g2, sg2, sg2d = relu_grad_sums(dH2, Dacc * bn2.scale + bn2.shift, Dacc)
    c2 = bn_grad(bn2, affine["bn2"][0], sg2, sg2d, geo.rows_out, training)
    dD = apply_bn_grad(c2, g2, Dacc).to(cdt)
    del g2, dH2, Dacc
    # depthwise, BN1 + ReLU
    bn1 = bns["bn1"]
    g1, sg1, sg1a, ddw = ctx.dw_impl.backward(dD, p.A, dww.to(cdt), geo, bn1)
    c1 = bn_grad(bn1, affine["bn1"][0], sg1, sg1a, geo.rows_in, training)
    dA = apply_bn_grad(c1, g1.to(acc), p.A.to(acc)).to(cdt)
    del g1, dD
    # first pointwise (+ skip conv, residual, identity skip)
    pw1_gemm = _dense_gemm(L.total_mid, L.in_channels)
    dpw1 = plan.packed_pw1(K.pointwise.pointwise_grad_weight(dA, p.X, pw1_gemm, p.W1.numel()))
    dX = K.pointwise.pointwise_grad_input(dA, p.W1, pw1_gemm, L.in_channels, out_dtype=acc)
    dskw = None
    if p.S is not None:
        skip_gemm = _dense_gemm(L.out_channels, L.in_channels)
        dskw = K.pointwise.pointwise_grad_weight(dS, p.Xs, skip_gemm, skw.numel())
        dXs = K.pointwise.pointwise_grad_input(dS, skw.to(cdt), skip_gemm, L.in_channels,
                                               out_dtype=acc)
        view = dX.view(geo.n, geo.h, geo.w, -1)[:, ::block.stride, ::block.stride]
        view += dXs.view(geo.n, geo.ho, geo.wo, -1)
    ex = mask.shape[0]
    if L.residual or mode == 1:
        dYa = dY.to(acc).view(geo.n, hw, -1)
        coef = torch.zeros(ex, dtype=acc, device=x.device)
        if L.residual:
            coef = coef + mask[:, :plan.n_conv].sum(1)
        if mode == 1:
            coef = coef + mask[:, -1]
        dX += (dYa * coef.view(-1, 1, 1)).view(geo.rows_out, -1)
    dmask = torch.zeros_like(weights)
    dm = dm if ctx.per_example else dm.sum(0)
    dmask[..., plan.on(x.device).mask_cols] = dm.to(weights.dtype)
    f = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
    has_skip_bn = p.S is not None
    return (_to_format(geo.image_in(dX), x).to(x.dtype), dmask,
            f(dpw1, pw1), f(ddw, dww), f(dpw2, pw2), f(dskw, skw) if skw is not None else None,
            f(plan.unshuffle(c1.dgamma), block.bn1_weight),
            f(plan.unshuffle(c1.dbeta), block.bn1_bias),
            f(c2.dgamma, block.bn2_weight), f(c2.dbeta, block.bn2_bias),
            f(c3.dgamma, block.bn3_weight), f(c3.dbeta, block.bn3_bias),
            f(cS.dgamma, block.skip_bn_weight) if has_skip_bn else None,
            f(cS.dbeta, block.skip_bn_bias) if has_skip_bn else None)


def mixed_block_forward(block, x: Tensor, weights: Tensor,
                        depthwise: Optional[DepthwiseStep] = None) -> Tensor:
    """y = sum_i w_i * block_i(x) with the fused kernels (see the module docstring).

    x (Tensor[N, C_in, H, W], NCHW or channels_last), weights (Tensor[K] or Tensor[N, K]);
    returns Tensor[N, C_out, H', W'] in x's memory format. ``depthwise`` replaces the
    depthwise step (the CUDA backend passes its own)."""
    skip_bn = block.skip_weight is not None
    return _MixedBlockFunction.apply(
        block, depthwise or TritonDepthwise(), x, weights, block.pw1_weight, block.dw_weight,
        block.pw2_weight, block.skip_weight, block.bn1_weight, block.bn1_bias,
        block.bn2_weight, block.bn2_bias, block.bn3_weight, block.bn3_bias,
        block.skip_bn_weight if skip_bn else None, block.skip_bn_bias if skip_bn else None)
