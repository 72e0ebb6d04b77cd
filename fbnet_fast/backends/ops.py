"""Typed wrappers of the C++ custom ops, with fake (shape) kernels and autograd.

Importing this module builds/loads the C++ kernels (``jit.py``); when that fails the
wrappers raise with the reason and ``jit.why_unavailable()`` says why.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import jit
from ..nn.space import conv_out

__all__ = ["depthwise_conv2d", "dw_conv", "dw_conv_backward", "dw_conv_bn", "dw_conv_bn_backward",
           "channel_stats", "scale_shift", "bn_backward", "AVAILABLE"]

AVAILABLE = jit.load()


def _require() -> None:
    if not AVAILABLE:
        raise RuntimeError(jit.why_unavailable())


def dw_conv(x: Tensor, weights: Sequence[Tensor], stride: int) -> Tensor:
    """Depthwise conv, pad K//2, over channel groups with their own odd K.

    x (Tensor[N, C, H, W], any memory format), weights (list of Tensor[C_g, K_g, K_g] or
    [C_g, 1, K_g, K_g], sum C_g = C); returns channels_last Tensor[N, C, ceil(H/s), ceil(W/s)].
    """
    _require()
    return torch.ops.fbnet_fast.dw_conv.default(x, list(weights), stride)


def dw_conv_backward(grad: Tensor, x: Tensor, weights: Sequence[Tensor], stride: int):
    """(grad_x channels_last, [grad_weight per group]) of ``dw_conv``."""
    _require()
    return torch.ops.fbnet_fast.dw_conv_backward.default(grad, x, list(weights), stride)


def depthwise_conv2d(x: Tensor, weight: Tensor, stride: int = 1) -> Tensor:
    """``F.conv2d(x, weight, stride=stride, padding=K//2, groups=C)`` for weight Tensor[C, 1, K, K]."""
    return dw_conv(x, [weight], stride)


def dw_conv_bn(a: Tensor, weights: Sequence[Tensor], stride: int, scale: Tensor,
               shift: Tensor, a_weight: Optional[Tensor] = None) -> tuple:
    """(out, stats): out = ``dw_conv(relu(a * scale + shift), weights, stride)`` (BN + ReLU
    applied as the conv reads its input) and stats Tensor[2, C], the per-channel mean and
    biased variance of out (its batch statistics, taken as it is written). With a_weight
    (Tensor[C, C_in]), ``a`` is the first 1x1's input and its output a a_weight^T is made
    per tile, never written."""
    _require()
    n, c, h, w = a.shape
    if a_weight is not None:
        c = a_weight.shape[0]
    out = a.new_empty((n, c, conv_out(h, stride), conv_out(w, stride))).contiguous(
        memory_format=torch.channels_last)
    stats = torch.ops.fbnet_fast.dw_conv_bn_out.default(a, list(weights), stride, scale, shift,
                                                        out, a_weight)
    return out, stats


def dw_conv_bn_backward(grad: Tensor, a: Tensor, weights: Sequence[Tensor], stride: int,
                        scale: Tensor, shift: Tensor, mean: Tensor) -> tuple:
    """(g, grad_weights, sums) of ``dw_conv_bn``: g = dL/d(a * scale + shift) (channels_last),
    the weights' grads, and sums Tensor[2, C] float64, per channel sum(g) and
    sum(g * (a - mean)) (what the backward of a BN with that mean needs)."""
    _require()
    g = torch.empty_like(a, memory_format=torch.channels_last)
    gws, sums, _ = torch.ops.fbnet_fast.dw_conv_bn_backward_out.default(
        grad, a, list(weights), stride, scale, shift, mean, g)
    return g, gws, sums


def channel_stats(x: Tensor) -> tuple:
    """(mean, biased variance) per column of x (Tensor[M, C], contiguous channels)."""
    _require()
    return torch.ops.fbnet_fast.channel_stats.default(x)


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
    """``[relu](x * scale + shift)`` for x Tensor[M, C], scale and shift Tensor[C]; one pass."""
    _require()
    return torch.ops.fbnet_fast.scale_shift.default(x, scale, shift, relu)


def bn_backward(grad: Tensor, z: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                bias: Tensor, relu: bool, training: bool) -> tuple:
    """(dz, dweight, dbias) of ``y = [relu](BN(z))`` for z, grad Tensor[M, C]; two passes."""
    _require()
    return torch.ops.fbnet_fast.bn_backward.default(grad, z, mean, rstd, weight, bias, relu,
                                                    training)


if AVAILABLE:
    @torch.library.register_fake("fbnet_fast::dw_conv")
    def _(x, weights, stride):
        torch._check(x.dim() == 4, lambda: f"dw_conv: x must be 4-d, got {x.dim()}")
        torch._check(sum(w.shape[0] for w in weights) == x.shape[1],
                     lambda: "dw_conv: the weights' channels must add up to x's channels")
        n, c, h, w = x.shape
        return x.new_empty((n, c, conv_out(h, stride), conv_out(w, stride))).contiguous(
            memory_format=torch.channels_last)

    @torch.library.register_fake("fbnet_fast::dw_conv_backward")
    def _(grad, x, weights, stride):
        gx = torch.empty_like(x, memory_format=torch.channels_last)
        return gx, [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]

    @torch.library.register_fake("fbnet_fast::dw_conv_out")
    def _(x, weights, stride, out):
        torch._check(out.dim() == 4, lambda: "dw_conv_out: out must be 4-d")

    @torch.library.register_fake("fbnet_fast::dw_conv_backward_out")
    def _(grad, x, weights, stride, grad_x):
        return [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]

    @torch.library.register_fake("fbnet_fast::dw_conv_bn_out")
    def _(a, weights, stride, scale, shift, out, a_weight=None, stats=True):
        c = a.shape[1] if a_weight is None else a_weight.shape[0]
        return a.new_empty((2, c) if stats else (0,))

    @torch.library.register_fake("fbnet_fast::dw_conv_bn_backward_out")
    def _(grad, a, weights, stride, scale, shift, mean, grad_a=None, x=None, x_weight=None,
          grad_x=None, out=None, out_coef=None, weight_grads=True, a_weight=None):
        c = a.shape[1] if a_weight is None else a_weight.shape[0]
        sums = a.new_empty((2, c), dtype=torch.float64)
        if not weight_grads:
            return [], sums, a.new_empty(0)
        gxw = a.new_empty(0) if x_weight is None else torch.empty_like(x_weight)  # g^T x
        return ([torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights],
                sums, gxw)

    @torch.library.register_fake("fbnet_fast::combine_bn_out")
    def _(z, mask, mean, var, gamma, beta, eps, out):
        torch._check(z.dim() == 4, lambda: "combine_bn_out: z must be [N, P, k, O]")

    @torch.library.register_fake("fbnet_fast::combine_bn_backward_out")
    def _(z, dy, mask, mean, var, gamma, beta, eps, training, dz):
        torch._check(z.dim() == 4, lambda: "combine_bn_backward_out: z must be [N, P, k, O]")
        like = torch.empty_like(gamma, memory_format=torch.contiguous_format)
        return z.new_empty(z.shape[0], z.shape[2]), like, torch.empty_like(like)

    @torch.library.register_fake("fbnet_fast::pointwise_bn_out")
    def _(d, scale, shift, weight, segments, z, stats=True):
        torch._check(d.dim() == 2 and z.dim() == 2, lambda: "pointwise_bn_out: [M, C] matrices")
        return d.new_empty((2, z.shape[1]) if stats else (0,))

    @torch.library.register_fake("fbnet_fast::pointwise_bn_backward_out")
    def _(dz, d, scale, shift, mean, weight, segments, grad_d, weight_grad=True):
        torch._check(d.dim() == 2 and dz.dim() == 2,
                     lambda: "pointwise_bn_backward_out: [M, C] matrices")
        gw = torch.empty_like(weight) if weight_grad else weight.new_empty(0)
        return gw, d.new_empty((2, d.shape[1]), dtype=torch.float64)

    @torch.library.register_fake("fbnet_fast::bn_coef")
    def _(mean, var, gamma, beta, eps):
        return tuple(torch.empty_like(mean, memory_format=torch.contiguous_format)
                     for _ in range(3))

    @torch.library.register_fake("fbnet_fast::bn_grad_coef")
    def _(sum_g, sum_gz, mean, rstd, gamma, count, training, centered):
        return tuple(torch.empty_like(gamma, memory_format=torch.contiguous_format)
                     for _ in range(5))

    @torch.library.register_fake("fbnet_fast::pw1_dense")
    def _(w, blocks, rows, cols):
        return w.new_empty((rows, cols))

    @torch.library.register_fake("fbnet_fast::pw1_dense_out")
    def _(w, blocks, dense):
        torch._check(dense.dim() == 2, lambda: "pw1_dense_out: dense must be [rows, cols]")

    @torch.library.register_fake("fbnet_fast::pw1_packed")
    def _(dense, blocks):
        cols = dense.shape[1]
        return dense.new_empty(max(o + r * (cols // g) for _, r, o, g in
                                   zip(*[iter(blocks)] * 4)))

    @torch.library.register_fake("fbnet_fast::pw1_bn_stats")
    def _(w1, x_mean, x_cov, rows):
        torch._check(w1.dim() == 2, lambda: "pw1_bn_stats: w1 must be [T, C_in]")
        return w1.new_empty(w1.shape[0]), w1.new_empty(w1.shape[0])

    @torch.library.register_fake("fbnet_fast::pw1_cov_backward")
    def _(grad_x, grad_w1, x, w1, beta, delta, x_mean, x_cov):
        torch._check(grad_x.shape == x.shape, lambda: "pw1_cov_backward: grad_x like x")

    @torch.library.register_fake("fbnet_fast::bn_running_update")
    def _(means, vars, tracked, stats, counts, momenta):
        torch._check(stats.dim() == 2, lambda: "bn_running_update: stats must be [2, S]")

    @torch.library.register_fake("fbnet_fast::pooled_empty")
    def _(like, size):
        return like.new_empty(size)

    @torch.library.register_fake("fbnet_fast::channel_stats")
    def _(x):
        torch._check(x.dim() == 2, lambda: "channel_stats: x must be [M, C]")
        return x.new_empty(x.shape[1]), x.new_empty(x.shape[1])

    @torch.library.register_fake("fbnet_fast::channel_cov")
    def _(x):
        torch._check(x.dim() == 2, lambda: "channel_cov: x must be [M, C]")
        return x.new_empty(x.shape[1]), x.new_empty(x.shape[1], x.shape[1])

    @torch.library.register_fake("fbnet_fast::scale_shift")
    def _(x, scale, shift, relu):
        torch._check(x.dim() == 2, lambda: "scale_shift: x must be [M, C]")
        return x.new_empty(x.shape)

    @torch.library.register_fake("fbnet_fast::bn_backward")
    def _(grad, z, mean, rstd, weight, bias, relu, training):
        torch._check(z.dim() == 2 and grad.shape == z.shape, lambda: "bn_backward: [M, C] inputs")
        return z.new_empty(z.shape), z.new_empty(z.shape[1]), z.new_empty(z.shape[1])

    @torch.library.register_fake("fbnet_fast::scale_shift_out")
    def _(x, scale, shift, relu, out):
        torch._check(x.dim() == 2 and out.shape == x.shape, lambda: "scale_shift_out: [M, C]")

    @torch.library.register_fake("fbnet_fast::bn_backward_out")
    def _(grad, z, mean, rstd, weight, bias, relu, training, grad_z):
        torch._check(z.dim() == 2 and grad.shape == z.shape,
                     lambda: "bn_backward_out: [M, C] inputs")
        return z.new_empty(z.shape[1]), z.new_empty(z.shape[1])

    @torch.library.register_fake("fbnet_fast::bn_grad_apply_out")
    def _(grad, z, coef, out):
        torch._check(z.dim() == 2 and grad.shape == z.shape and out.shape == z.shape,
                     lambda: "bn_grad_apply_out: [M, C] inputs")

    def _setup_context(ctx, inputs, output):
        x, weights, stride = inputs
        ctx.save_for_backward(x, *weights)
        ctx.stride = stride

    def _backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        gx, gws = torch.ops.fbnet_fast.dw_conv_backward.default(grad, x, weights, ctx.stride)
        return gx, list(gws), None

    torch.library.register_autograd("fbnet_fast::dw_conv", _backward,
                                    setup_context=_setup_context)
