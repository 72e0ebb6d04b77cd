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
outputs at once. Each direction is one C++ call (csrc/cpu/mixed_block.cpp) that sequences
these kernels: no Python runs per block beyond the call. The backward recomputes the
intermediates from x, so only x, the mask, the weights and the BN batch statistics are
saved, and in the eager path X's covariance where BN1's statistics came from it; at small
maps the eager path also keeps D, Z and A where the forward writes it (``KEEP_BYTES``).
Both ops are registered with fake kernels, so torch.compile and export trace them; eager
calls run the same two C++ functions without the custom op's dispatch, the backward
recorded as a C++ autograd node (``mixed_block_eager``): no Python runs in it. The big
intermediates live in per-thread scratch buffers reused across calls (they hold about the
largest layer's peak, ``clear_workspace()`` frees them).
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch
from torch import Tensor

from . import jit
from ..nn.layout import BN_EPS
from .plan import (BNCoef, bn1_stats_via_covariance, call_fused_op, momentum_values, op_impl,
                   plan_for, register_fused_autograd)

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


def bn_coef_cpu(mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor,
                eps: float = BN_EPS) -> BNCoef:
    """``plan.bn_coef`` as one C++ call (csrc/cpu/per_channel.cpp)."""
    return BNCoef(mean, var, *torch.ops.fbnet_fast.bn_coef.default(mean, var, gamma, beta, eps))


def clear_workspace() -> None:
    """Free this thread's scratch buffers (csrc/cpu/mixed_block.cpp) and the idle blocks of
    the pool the kept intermediates come from (both are kept to be reused by the next
    call)."""
    module = jit.cpu_module()
    if module is not None:
        module.clear_workspace()
        torch.ops.fbnet_fast.release_pool.default(torch.empty(0))


KEEP_BYTES = 12 << 20
"""The most bytes a training call of a block with up to 64 input channels saves for its
backward beyond x, the weights and the statistics (wider blocks: that much more in
proportion to their channels, whose recomputation costs more per byte; keep_budget in
csrc/cpu/mixed_block.cpp): under it the forward keeps D (the depthwise output) and Z (the
second 1x1s'), and A where it writes A anyway (BN1's statistics from A: small maps) or where
the backward would make A whole again (more than 32 input channels: the forward then writes
A, and takes BN1's statistics from it, if A fits too), and the backward recomputes at most A
instead of the whole forward; where A, D and Z do not fit together but D and Z do (stride
1, more than 32 input channels) it keeps A and Z, and the backward remakes D. Per byte, D
and Z cost the most to recompute. With 12 MiB a whole step saves under an eighth of the
reference's bytes at the quick preset's size and at 224x224 batch 8 (228 of 2,803 MB there,
peak RSS 1,390 MiB); every 7x7 layer at batch 8 keeps. 0 always recomputes
(bench/RESULTS.md)."""


@functools.lru_cache(maxsize=256)
def _cpu_plan(layout: str):
    """The C++ side's plan of a layout (csrc/cpu/mixed_block.cpp), built once."""
    p = plan_for(layout)
    L = p.layout
    return jit.cpu_module().Plan(
        in_channels=L.in_channels, out_channels=L.out_channels, total_mid=L.total_mid,
        stride=L.stride, skip_index=L.skip_index, skip_is_conv=bool(L.skip_is_conv),
        residual=bool(L.residual), conv_cols=list(p.mask_cols[:p.n_conv]),
        dw_runs=[v for r in p.dw_runs for v in r], pw2_segments=p.pw2_segments,
        pw1_blocks=p.pw1_block_ints, perm=p.on("cpu").perm, eps=BN_EPS)


def _via_covariance(x: Tensor) -> bool:
    """``plan.bn1_stats_via_covariance`` for x, handed to the C++ sequence so that the rule
    stays in one place."""
    n, c, h, w = x.shape
    return bn1_stats_via_covariance(n * h * w, c)


# --- the ops ----------------------------------------------------------------------------

def _run(forward, args: tuple, keep_bytes: int, running_update: Optional[tuple]):
    """``forward`` (the C++ module's forward or forward_with_grad) on ``fused_op_args``."""
    *tensors, running, layout, training = args
    momenta, tracked = running_update or ((), ())
    return forward(_cpu_plan(layout), *tensors, running, training, _via_covariance(tensors[0]),
                   keep_bytes, momentum_values(momenta), list(tracked))


def mixed_block_cpu_impl(
        x: Tensor, mask: Tensor, pw1: Tensor, dw: Tensor, pw2: Tensor, bn1_weight: Tensor,
        bn1_bias: Tensor, bn2_weight: Tensor, bn2_bias: Tensor, bn3_weight: Tensor,
        bn3_bias: Tensor, skip_weight: Optional[Tensor], skip_bn_weight: Optional[Tensor],
        skip_bn_bias: Optional[Tensor], running: List[Tensor], layout: str,
        training: bool, running_update: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
    """Returns (y Tensor[N, C_out, H', W'] in x's memory format, statistics Tensor[2, S]).

    The statistics are each BN's (mean, biased variance) used: batch statistics in training,
    the running ones in eval; ``running`` holds the running mean/var of bn1, bn2, bn3, skip_bn.
    ``running_update`` (eager calls in training; not part of the op, which mutates nothing):
    ``(momenta, tracked)`` as ``plan.update_running`` takes them, for the call to update the
    running statistics itself.
    """
    y, stats, _ = _run(jit.cpu_module().forward,
                       (x, mask, pw1, dw, pw2, bn1_weight, bn1_bias, bn2_weight, bn2_bias,
                        bn3_weight, bn3_bias, skip_weight, skip_bn_weight, skip_bn_bias,
                        running, layout, training), -1, running_update)
    return y, stats


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
        layout: str, training: bool, weight_grads: bool = True) -> List[Tensor]:
    """Gradients of ``mixed_block_cpu`` w.r.t. x, mask, pw1, dw, pw2, bn1-3 weight/bias and the
    skip conv (empty tensors when the skip is the identity), recomputing the forward from x.
    Without ``weight_grads`` (no weight needs one: a θ step) the three convs' weight
    gradients are skipped and come back empty (a quick-size θ step runs 1.19x faster)."""
    return jit.cpu_module().backward(
        _cpu_plan(layout), grad, x, mask, pw1, dw, pw2, bn1_weight, bn1_bias, bn2_weight,
        bn2_bias, bn3_weight, bn3_bias, skip_weight, skip_bn_weight, skip_bn_bias, stats,
        training, _via_covariance(x), weight_grads, True, [])


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


register_fused_autograd("mixed_block_cpu")  # the custom op's, for torch.compile's traces


class mixed_block_eager:
    """The eager path (plan.run_fused_op), also cpu_layers' for single blocks: the C++
    forward, which records its backward as a C++ autograd node (csrc/cpu/mixed_block.cpp,
    MixedBlockCpuBackward) where an input needs a gradient. That node saves x, the mask,
    the weights, the statistics and, where they fit ``KEEP_BYTES``, the intermediates the
    backward would otherwise recompute; it skips the weights' gradients when none needs one
    (the θ steps of a search) and the skip path's share of the mask's when the mask needs
    none (weight steps, discrete models). The running statistics are updated in the call."""

    updates_running = True
    impl = staticmethod(mixed_block_cpu_impl)

    @staticmethod
    def apply(*args) -> tuple:
        """(y, statistics) from ``fused_op_args``, then maybe ``running_update``."""
        return _run(jit.cpu_module().forward_with_grad, args[:17], KEEP_BYTES,
                    args[17] if len(args) > 17 else None)


# --- the backend entry point --------------------------------------------------------------

def mixed_block_forward(block, x: Tensor, weights: Tensor) -> Tensor:
    """``MixedBlock`` forward on the fused op; updates the BN running statistics in training."""
    return call_fused_op(torch.ops.fbnet_fast.mixed_block_cpu, block, x, weights.to(x.dtype),
                         eager=mixed_block_eager)
