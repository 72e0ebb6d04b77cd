"""The discrete FBNet models on the fused CPU backend's C++ kernels, for training them on the
CPU: fine-tuning a searched architecture, ``fbnet-fast train`` and ``fbnet-fast baseline``.
A candidate block trains as the fused MixedBlock op of its one candidate; the BNs (with the
ReLU after them) and depthwise convs of the rest, and of blocks the op does not cover, run
on these layers. The search also puts its SuperNet's stem and head BN + ReLU on them
(``registry.fast_layers``; the MixedBlocks have their own ops).

PyTorch's channels-last BN is slow on the CPU at the narrow widths of these models: at
[32, 8, 32, 32] its forward and backward with the ReLU take 4.4 ms, these kernels 1.2 ms
(bench/RESULTS.md). The layers are subclasses of the modules they replace and ``accelerate``
swaps the classes in place, so parameters (the same objects), buffers and state dicts do not
change. Anything the kernels do not cover (other devices and dtypes, NCHW inputs, eval-mode
BN, BNs without running statistics) runs the parent module's own forward.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import ops
from .fused_cpu import bn_coef_cpu, mixed_block_eager, nhwc
from .plan import Geometry, run_fused_op, update_running
from ..nn.blocks import CandidateBlock, ConvBNReLU
from ..nn.layout import MixedLayout

__all__ = ["BatchNorm2d", "DepthwiseConv2d", "accelerate"]


def _fits(x: Tensor) -> bool:
    return (ops.AVAILABLE and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.is_inference_mode_enabled())


class _TrainBN(torch.autograd.Function):
    """Training-mode BN (+ ReLU) on the [N*H*W, C] matrix of channels-last data: statistics,
    then one scale-shift pass; the backward's two passes (bn_backward) recompute the ReLU's
    mask from x, so x alone is saved (PyTorch keeps the BN output for the ReLU too)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, tracked, momentum, eps: float,
                relu: bool):
        z = nhwc(x)
        mean, var = ops.channel_stats(z)
        update_running([running_mean], [running_var], torch.stack((mean, var)), [z.shape[0]],
                       [momentum], [tracked])
        bn = bn_coef_cpu(mean, var, weight, bias, eps)
        y = torch.empty_like(x, memory_format=torch.channels_last)
        torch.ops.fbnet_fast.scale_shift_out.default(z, bn.scale, bn.shift, relu, nhwc(y))
        ctx.save_for_backward(x, mean, bn.rstd, weight, bias)
        ctx.relu = relu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, mean, rstd, weight, bias = ctx.saved_tensors
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        dw, db = torch.ops.fbnet_fast.bn_backward_out.default(
            nhwc(grad), nhwc(x), mean, rstd, weight, bias, ctx.relu, True, nhwc(dx))
        return dx, dw, db, None, None, None, None, None, None


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d``, followed by a ReLU when ``relu`` is set (``accelerate`` sets it
    where it takes the ReLU module out), training on the C++ kernels where they apply."""

    relu = False

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.affine and self.track_running_stats and _fits(x)
                and x.numel() > x.shape[1]):
            y = super().forward(x)
            return torch.relu(y) if self.relu else y
        return _TrainBN.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                              self.num_batches_tracked, self.momentum, self.eps, self.relu)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` (groups = channels, padding K // 2, no bias; ``accelerate``
    swaps only those) on the C++ depthwise kernel."""

    def forward(self, x: Tensor) -> Tensor:
        if _fits(x):
            return ops.depthwise_conv2d(x, self.weight, self.stride[0])
        return super().forward(x)


class FusedCandidateBlock(CandidateBlock):
    """A candidate block that trains as the fused MixedBlock op of a layout holding only its
    own candidate, on its own weights (views) with mask 1: six C++ calls instead of nine
    layers, and only x kept for the backward. Fine-tuning the quick search's four
    architectures takes a fifth less time than on the separate layers (bench/RESULTS.md)."""

    def forward(self, x: Tensor) -> Tensor:
        bns = (self.bn1, self.bn2, self.bn3)
        if not (self.training and _fits(x) and all(bn.affine and bn.track_running_stats
                                                  for bn in bns)):
            return super().forward(x)
        geo = Geometry(x.shape[0], x.shape[2], x.shape[3], self.stride)
        if min(geo.rows_in, geo.rows_out) <= 1:
            return super().forward(x)  # nn.BatchNorm2d's error for one value per channel
        running = [t for bn in bns for t in (bn.running_mean, bn.running_var)]
        momenta = [bn.momentum for bn in bns]
        tracked = [bn.num_batches_tracked for bn in bns]
        y, stats, updated = run_fused_op(torch.ops.fbnet_fast.mixed_block_cpu, (
            x, x.new_ones(1), self.conv_pw.weight.view(-1), self.conv_dw.weight.view(-1),
            self.conv_pwl.weight.view(-1), self.bn1.weight, self.bn1.bias, self.bn2.weight,
            self.bn2.bias, self.bn3.weight, self.bn3.bias, None, None, None, running,
            self._layout_key, True), mixed_block_eager, (momenta, tracked))
        if not updated:
            update_running(running[0::2], running[1::2], stats,
                           [geo.rows_in, geo.rows_out, geo.rows_out], momenta, tracked)
        return y

    @functools.cached_property
    def _layout_key(self) -> str:
        name = f"k{self.kernel_size}_e{self.exp_ratio}" + (
            f"_g{self.groups}" if self.groups > 1 else "")
        return MixedLayout.build(self.in_chs, self.out_chs, self.stride, (name,)).key()


def _is_depthwise(conv: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d:
        return False
    k, s = conv.kernel_size, conv.stride
    return (conv.groups == conv.in_channels == conv.out_channels and conv.bias is None
            and k[0] == k[1] and k[0] % 2 == 1 and conv.padding == (k[0] // 2, k[0] // 2)
            and s[0] == s[1] and s[0] in (1, 2) and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros")


def _swap_bn(parent: nn.Module, bn: str, act: str | None = None) -> None:
    """Make ``parent.<bn>`` a ``BatchNorm2d``; with ``act`` (a ReLU module after it) take
    that ReLU into the BN."""
    m = parent._modules[bn]
    if type(m) is not nn.BatchNorm2d:
        return
    m.__class__ = BatchNorm2d
    if act is not None and type(parent._modules[act]) is nn.ReLU:
        m.relu = True
        parent._modules[act] = nn.Identity()


def accelerate(model: nn.Module) -> nn.Module:
    """Swap, in place, the BNs (taking in the ReLUs after them) and depthwise convs of the
    candidate blocks and conv-BN-ReLU layers of ``model`` for this module's layers; returns
    ``model``. The parameters stay the same objects, so an optimizer built before still
    holds them."""
    for m in list(model.modules()):
        if isinstance(m, CandidateBlock):
            if type(m) is CandidateBlock:
                m.__class__ = FusedCandidateBlock
            _swap_bn(m, "bn1", "act1")
            _swap_bn(m, "bn2", "act2")
            _swap_bn(m, "bn3")
            if _is_depthwise(m.conv_dw):
                m.conv_dw.__class__ = DepthwiseConv2d
        elif isinstance(m, ConvBNReLU):
            _swap_bn(m, "1", "2")
    return model
