"""The Triton MixedBlock backend: fused kernels, recomputation in backward
(docs/architecture.md, "The fused plan").

Forward: one segmented GEMM for every candidate's first 1x1 (BN1 statistics in its
epilogue), one depthwise pass per kernel size (BN1 + ReLU on load, BN2 statistics out),
the second 1x1s as one segmented GEMM (BN2 + ReLU on load, BN3 statistics out), then the
mask-weighted combine. Only x, the mask, the BN statistics and the weights are saved;
backward recomputes the intermediates. Tensors are NHWC rows inside; the output keeps the
input's memory format. CPU tensors run under ``TRITON_INTERPRET=1`` (tests only).

Both directions are ``torch.library`` custom ops (``fbnet_fast::mixed_block_triton`` and
its ``_backward``; ``define_ops`` makes the same pair for another depthwise step, as
fused_cuda does), with fake kernels and registered autograd, so ``torch.compile`` traces
a MixedBlock as one node. The ops take tensors and plain values only and mutate nothing:
the forward returns the BN statistics it used and the adapter (``plan.call_fused_op``)
updates the running statistics. Eager calls run the same two implementations through an
``autograd.Function`` (``plan.register_fused_autograd``), without the custom op's dispatch,
and its backward skips the weights' gradient kernels when the weights are frozen.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Protocol

import torch
from torch import Tensor

from .plan import (BNCoef, FusedPlan, Geometry, Segment, batch_stats, bn_coef, bn_grad,
                   call_fused_op, plan_for, register_fused_autograd)

__all__ = ["mixed_block_forward", "why_unavailable", "load_kernels", "DepthwiseStep",
           "TritonDepthwise", "define_ops"]

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
        return load_kernels().utils.interpreter_problem()
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

    def backward(self, dd: Tensor, a: Tensor, w: Tensor, geo: Geometry, bn1: BNCoef,
                 weight_grad: bool = True) -> tuple:
        """(g, sum(g), sum(g * a), dw) from dd = dL/dd (Tensor[N*H'*W', T]): g (a's shape and
        dtype) = dL/d(a * scale + shift) through the ReLU, its per-channel sums (accumulator
        dtype) as ``bn_grad`` takes them, and dw the flat weight gradient (accumulator dtype;
        None allowed without ``weight_grad``)."""
        ...


class TritonDepthwise(DepthwiseStep):
    """The depthwise step on the Triton kernels (BN1 + ReLU and the sums fused in)."""

    def forward(self, a, w, geo: Geometry, bn1: BNCoef, stats: bool):
        return load_kernels().depthwise.depthwise_forward(
            a, w, geo.n, geo.h, geo.w, geo.stride, geo.runs, bn1.scale, bn1.shift, stats)

    def backward(self, dd, a, w, geo: Geometry, bn1: BNCoef, weight_grad: bool = True):
        K = load_kernels().depthwise
        shape = (geo.n, geo.h, geo.w, geo.stride, geo.runs)
        dw = K.depthwise_grad_weight(dd, a, *shape, w.numel(), bn1.scale, bn1.shift) \
            if weight_grad else None
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


def _acc_dtype(cdt: torch.dtype) -> torch.dtype:
    return load_kernels().utils.acc_dtype(cdt)


def _dense_gemm(out_channels: int, in_channels: int) -> tuple:
    """The segments of one dense [out, in] weight: the first 1x1 (shuffle folded in), the skip."""
    return (Segment(0, out_channels, 0, in_channels, 0),)


class _Params(NamedTuple):
    """The op's weights (the skip conv's None without one) and each BN's (gamma, beta) in the
    accumulator dtype, BN1's in expanded-column order."""

    pw1: Tensor
    dw: Tensor
    pw2: Tensor
    skip: Optional[Tensor]
    affine: dict


def _params(plan: FusedPlan, acc, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb) -> _Params:
    pairs = {"bn1": (g1, b1), "bn2": (g2, b2), "bn3": (g3, b3)}
    if sw is not None:
        pairs["skip_bn"] = (sg, sb)
    affine = {r: (g.to(acc), b.to(acc)) for r, (g, b) in pairs.items()}
    affine["bn1"] = tuple(plan.shuffle(t) for t in affine["bn1"])
    return _Params(pw1, dw, pw2, sw, affine)


def _coefs(plan: FusedPlan, packed: Tensor, affine: dict) -> dict:
    """Each BN's ``BNCoef`` from packed (mean, biased var) statistics (``plan.pack_stats``)."""
    stats = plan.unpack_stats(packed.to(affine["bn3"][0].dtype))
    return {r: bn_coef(*stats[r], *affine[r]) for r in affine}


@dataclass
class _Pass:
    X: Tensor
    Xs: Tensor          # X at the strided positions (the skip conv's input)
    W1: Tensor          # dense [total_mid * C_in] first pointwise, shuffle folded in
    A: Tensor
    D: Tensor
    Z: Tensor
    S: Optional[Tensor]


def _run_pass(plan: FusedPlan, dw_impl: DepthwiseStep, x, p: _Params, cdt, geo: Geometry,
              bns: dict, training_stats: bool) -> _Pass:
    """Compute A, D, Z (and S). With ``training_stats`` the BNs come from the epilogues'
    sums and are stored in ``bns``; otherwise ``bns`` holds them already."""
    K = load_kernels()
    L = plan.layout
    pw1, dww, pw2, skw = (t.to(cdt) if t is not None else None for t in p[:4])

    def bn(prefix, s1, s2, count):
        if training_stats:
            bns[prefix] = bn_coef(*batch_stats(s1, s2, count), *p.affine[prefix])
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
    if L.stride != 1:
        Xs = X.view(geo.n, geo.h, geo.w, -1)[:, ::L.stride, ::L.stride]
        Xs = Xs.reshape(geo.rows_out, -1).contiguous()
    if skw is not None:
        S, s1, s2 = K.pointwise.pointwise_forward(
            Xs, skw, _dense_gemm(L.out_channels, L.in_channels), L.out_channels,
            stats=training_stats)
        bn("skip_bn", s1, s2, geo.rows_out)
    return _Pass(X, Xs, W1, A, D, Z, S)


def _skip_mode(plan: FusedPlan):
    K = load_kernels().combine
    L = plan.layout
    if L.skip_index < 0:
        return K.SKIP_NONE
    return K.SKIP_CONV if L.skip_is_conv else K.SKIP_IDENTITY


def _mask(plan: FusedPlan, weights: Tensor, acc: torch.dtype) -> Tensor:
    """The mask columns the combine reads (conv candidates, then skip) as Tensor[1 or N, k]."""
    cols = plan.on(weights.device).mask_cols
    return weights[..., cols].reshape(-1, len(plan.mask_cols)).to(acc).contiguous()


def _format(like: Tensor) -> torch.memory_format:
    """The memory format of the op's image outputs: channels_last when ``like`` is (and not
    also contiguous), else contiguous."""
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _to_format(out: Tensor, like: Tensor) -> Tensor:
    """An NHWC image view in ``like``'s memory format."""
    return out if _format(like) == torch.channels_last else out.contiguous()


# --- the ops' bodies --------------------------------------------------------------------

def _forward(dw_impl: DepthwiseStep, x, mask, params: tuple, running: list, layout: str,
             training: bool, cdt: torch.dtype) -> tuple:
    plan = plan_for(layout)
    L = plan.layout
    geo = plan.geometry(x.shape)
    acc = _acc_dtype(cdt)
    p = _params(plan, acc, *params)
    bns = {} if training else _coefs(plan, torch.stack([torch.cat(running[0::2]),
                                                        torch.cat(running[1::2])]), p.affine)
    r = _run_pass(plan, dw_impl, x, p, cdt, geo, bns, training)
    mode = _skip_mode(plan)
    bnS = bns.get("skip_bn")
    y = load_kernels().combine.combine_forward(
        r.Z, bns["bn3"].scale, bns["bn3"].shift, _mask(plan, mask, acc), geo.n,
        geo.ho * geo.wo, L.out_channels, res=r.X if L.residual else None,
        skip=r.X if mode == 1 else r.S, skip_mode=mode,
        skip_scale=bnS.scale if r.S is not None else None,
        skip_shift=bnS.shift if r.S is not None else None)
    stats = plan.pack_stats({role: (bn.mean, bn.var) for role, bn in bns.items()})
    return _to_format(geo.image_out(y), x), stats


def _backward(dw_impl: DepthwiseStep, dy, x, mask, params: tuple, packed: Tensor, layout: str,
              training: bool, cdt: torch.dtype, weight_grads: bool = True) -> list:
    """Without ``weight_grads`` (a θ step: the weights are frozen) the conv weights'
    gradient kernels do not run, and their gradients are empty tensors."""
    K = load_kernels()
    plan = plan_for(layout)
    L = plan.layout
    geo = plan.geometry(x.shape)
    acc = _acc_dtype(cdt)
    p = _params(plan, acc, *params)
    affine = p.affine
    bns = _coefs(plan, packed, affine)
    r = _run_pass(plan, dw_impl, x, p, cdt, geo, bns, False)
    m = _mask(plan, mask, acc)
    mode = _skip_mode(plan)
    hw = geo.ho * geo.wo
    dY = _rows(dy).to(cdt)
    bn3, bnS = bns["bn3"], bns.get("skip_bn")
    dm, sg, sgz, sgs, sgss = K.combine.combine_backward(
        dY, r.Z, bn3.scale, bn3.shift, m, geo.n, hw, L.out_channels,
        res=r.X if L.residual else None, skip=r.X if mode == 1 else r.S, skip_mode=mode,
        skip_scale=bnS.scale if r.S is not None else None,
        skip_shift=bnS.shift if r.S is not None else None)
    c3 = bn_grad(bn3, affine["bn3"][0], sg, sgz, geo.rows_out, training)
    cS = None
    if r.S is not None:
        cS = bn_grad(bnS, affine["skip_bn"][0], sgs, sgss, geo.rows_out, training)
    dZ, dS = K.combine.combine_grad_inputs(
        dY, r.Z, m, c3.alpha, c3.beta, c3.delta, geo.n, hw, L.out_channels, skip=r.S,
        skip_scale=bnS.scale if r.S is not None else None,
        skip_shift=bnS.shift if r.S is not None else None,
        skip_coeffs=cS[:3] if cS is not None else None)
    r.Z = None   # each expanded-size tensor goes as soon as it is used: they set the peak
    # second pointwise, BN2 + ReLU (the gradient overwritten in place, kernels/bn.py)
    bn2 = bns["bn2"]
    dpw2 = K.pointwise.pointwise_grad_weight(dZ, r.D, plan.pw2_groups, p.pw2.numel(),
                                             bn2.scale, bn2.shift) if weight_grads else None
    dD = K.pointwise.pointwise_grad_input(dZ, p.pw2.to(cdt), plan.pw2_groups, L.total_mid,
                                          out_dtype=acc)
    del dZ
    sg2, sg2d = K.bn.relu_grad_sums_(dD, r.D, bn2.scale, bn2.shift)
    c2 = bn_grad(bn2, affine["bn2"][0], sg2, sg2d, geo.rows_out, training)
    dD = K.bn.bn_grad_apply(dD, r.D, c2.alpha, c2.beta, c2.delta,
                            out=dD if cdt == acc else None, out_dtype=cdt)
    r.D = None
    # depthwise, BN1 + ReLU
    bn1 = bns["bn1"]
    dA, sg1, sg1a, ddw = dw_impl.backward(dD, r.A, p.dw.to(cdt), geo, bn1, weight_grads)
    del dD
    c1 = bn_grad(bn1, affine["bn1"][0], sg1, sg1a, geo.rows_in, training)
    dA = K.bn.bn_grad_apply(dA, r.A, c1.alpha, c1.beta, c1.delta, out=dA)
    r.A = None
    # first pointwise (+ skip conv, residual, identity skip)
    pw1_gemm = _dense_gemm(L.total_mid, L.in_channels)
    dpw1 = plan.packed_pw1(K.pointwise.pointwise_grad_weight(dA, r.X, pw1_gemm, r.W1.numel())) \
        if weight_grads else None
    dX = K.pointwise.pointwise_grad_input(dA, r.W1, pw1_gemm, L.in_channels, out_dtype=acc)
    dskw = None
    if r.S is not None:
        skip_gemm = _dense_gemm(L.out_channels, L.in_channels)
        dskw = K.pointwise.pointwise_grad_weight(dS, r.Xs, skip_gemm, p.skip.numel()) \
            if weight_grads else None
        dXs = K.pointwise.pointwise_grad_input(dS, p.skip.to(cdt), skip_gemm, L.in_channels,
                                               out_dtype=acc)
        view = dX.view(geo.n, geo.h, geo.w, -1)[:, ::L.stride, ::L.stride]
        view += dXs.view(geo.n, geo.ho, geo.wo, -1)
    if L.residual or mode == 1:
        dYa = dY.to(acc).view(geo.n, hw, -1)
        coef = torch.zeros(m.shape[0], dtype=acc, device=x.device)
        if L.residual:
            coef = coef + m[:, :plan.n_conv].sum(1)
        if mode == 1:
            coef = coef + m[:, -1]
        dX += (dYa * coef.view(-1, 1, 1)).view(geo.rows_out, -1)
    dmask = torch.zeros_like(mask)
    dmask[..., plan.on(x.device).mask_cols] = (dm if mask.dim() == 2 else dm.sum(0)).to(mask.dtype)
    grads = [dpw1, ddw, dpw2, plan.unshuffle(c1.dgamma), plan.unshuffle(c1.dbeta),
             c2.dgamma, c2.dbeta, c3.dgamma, c3.dbeta]
    grads += [dskw, cS.dgamma, cS.dbeta] if r.S is not None else [None, None, None]
    dx = _to_format(geo.image_in(dX), x).to(x.dtype)
    # a skipped or absent gradient is an empty tensor: the op returns tensors, none aliased
    return [dx, dmask] + [x.new_empty(0) if g is None else g.to(t.dtype)
                          for g, t in zip(grads, params)]


# --- the ops ----------------------------------------------------------------------------

def define_ops(name: str, dw_impl: DepthwiseStep) -> Callable:
    """Register ``fbnet_fast::<name>`` and ``fbnet_fast::<name>_backward`` running the fused
    pipeline with ``dw_impl`` as its depthwise step; returns the MixedBlock adapter
    ``forward(block, x, weights)``. The ops' arguments are those of ``mixed_block_cpu`` and
    ``compute_dtype`` (the autocast dtype, or x's), which is fixed by the caller so that
    the op, its fake and its backward agree."""
    qualname = f"fbnet_fast::{name}"

    def forward_impl(x, mask, *rest):
        *params, running, layout, training, compute_dtype = rest
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return _forward(dw_impl, x, mask, tuple(params), running, layout, training,
                            compute_dtype)

    def backward_impl(grad, x, mask, *rest, weight_grads=True):
        *params, stats, layout, training, compute_dtype = rest
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return _backward(dw_impl, grad, x, mask, tuple(params), stats, layout, training,
                             compute_dtype, weight_grads)

    @torch.library.custom_op(qualname, mutates_args=(), device_types=("cuda", "cpu"))
    def forward(x: Tensor, mask: Tensor, pw1: Tensor, dw: Tensor, pw2: Tensor,
                bn1_weight: Tensor, bn1_bias: Tensor, bn2_weight: Tensor, bn2_bias: Tensor,
                bn3_weight: Tensor, bn3_bias: Tensor, skip_weight: Optional[Tensor],
                skip_bn_weight: Optional[Tensor], skip_bn_bias: Optional[Tensor],
                running: List[Tensor], layout: str, training: bool,
                compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(y Tensor[N, C_out, H', W'] in compute_dtype and x's memory format, the BN
        statistics used Tensor[2, S]: batch ones in training, the running ones in eval)."""
        return forward_impl(x, mask, pw1, dw, pw2, bn1_weight, bn1_bias, bn2_weight, bn2_bias,
                            bn3_weight, bn3_bias, skip_weight, skip_bn_weight, skip_bn_bias,
                            running, layout, training, compute_dtype)

    @forward.register_fake
    def _(x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb, running, layout, training,
          compute_dtype):
        p = plan_for(layout)
        geo = p.geometry(x.shape)
        torch._check(x.shape[1] == p.layout.in_channels, lambda: f"{name}: input channels")
        y = x.new_empty(geo.n, p.layout.out_channels, geo.ho, geo.wo, dtype=compute_dtype)
        return (y.contiguous(memory_format=_format(x)),
                x.new_empty(2, sum(p.stat_sizes), dtype=_acc_dtype(compute_dtype)))

    @torch.library.custom_op(qualname + "_backward", mutates_args=(),
                             device_types=("cuda", "cpu"))
    def backward(grad: Tensor, x: Tensor, mask: Tensor, pw1: Tensor, dw: Tensor, pw2: Tensor,
                 bn1_weight: Tensor, bn1_bias: Tensor, bn2_weight: Tensor, bn2_bias: Tensor,
                 bn3_weight: Tensor, bn3_bias: Tensor, skip_weight: Optional[Tensor],
                 skip_bn_weight: Optional[Tensor], skip_bn_bias: Optional[Tensor],
                 stats: Tensor, layout: str, training: bool,
                 compute_dtype: torch.dtype) -> List[Tensor]:
        """Gradients w.r.t. x, mask, pw1, dw, pw2, bn1-3 weight/bias and the skip conv
        (empty tensors without one), recomputing the forward from x."""
        return backward_impl(grad, x, mask, pw1, dw, pw2, bn1_weight, bn1_bias, bn2_weight,
                             bn2_bias, bn3_weight, bn3_bias, skip_weight, skip_bn_weight,
                             skip_bn_bias, stats, layout, training, compute_dtype)

    @backward.register_fake
    def _(grad, x, mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3, sw, sg, sb, stats, layout,
          training, compute_dtype):
        skip = [torch.empty_like(t) if t is not None else x.new_empty(0) for t in (sw, sg, sb)]
        return ([torch.empty_like(x, memory_format=_format(x))]
                + [torch.empty_like(t) for t in (mask, pw1, dw, pw2, g1, b1, g2, b2, g3, b3)]
                + skip)

    eager = register_fused_autograd(name, forward_impl, backward_impl)
    op = getattr(torch.ops.fbnet_fast, name).default

    def mixed_block_forward(block, x: Tensor, weights: Tensor) -> Tensor:
        """y = sum_i w_i * block_i(x) on the fused op (see the module docstring); x
        (Tensor[N, C_in, H, W], NCHW or channels_last), weights (Tensor[K] or [N, K])."""
        return call_fused_op(op, block, x, weights, _compute_dtype(x), eager=eager)

    return mixed_block_forward


mixed_block_forward = define_ops("mixed_block_triton", TritonDepthwise())
