"""Reference blocks in plain PyTorch: the truth every fast path is tested against.

A candidate ``kK_eE[_gG]`` is (the paper's Table 2; docs/architecture.md)::

    h = ReLU(BN(conv1x1(x, C_in -> E*C_in, groups=G)))   # present also for E = 1
    h = channel_shuffle(h, G)                            # only when G > 1
    h = ReLU(BN(depthwise_KxK(h, stride=s)))
    y = BN(conv1x1(h, E*C_in -> C_out, groups=G))        # linear
    y = y + x   if s == 1 and C_in == C_out

``skip`` is the identity, or 1x1 conv (stride s) + BN + ReLU where the shape changes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .space import CandidateSpec, parse_candidate, shape_changes

__all__ = ["channel_shuffle", "CandidateBlock", "SkipBlock", "ConvBNReLU", "build_block"]


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's shuffle: channel g*cpg + j moves to j*groups + g."""
    if groups == 1:
        return x
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class ConvBNReLU(nn.Sequential):
    """conv (no bias) + BN (+ ReLU): the stem, the head and the skip conv."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, relu: bool = True):
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True) if relu else nn.Identity(),
        )


class CandidateBlock(nn.Module):
    """The inverted-residual candidate ``kK_eE[_gG]`` (straight-line forward, timm style)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, kernel_size: int,
                 exp_ratio: int, groups: int = 1):
        super().__init__()
        mid = in_chs * exp_ratio
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride
        self.kernel_size, self.exp_ratio, self.groups = kernel_size, exp_ratio, groups
        self.has_skip = not shape_changes(in_chs, out_chs, stride)
        self.conv_pw = nn.Conv2d(in_chs, mid, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = nn.ReLU()
        self.shuffle = ChannelShuffle(groups) if groups > 1 else nn.Identity()
        self.conv_dw = nn.Conv2d(mid, mid, kernel_size, stride, kernel_size // 2,
                                 groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.ReLU()
        self.conv_pwl = nn.Conv2d(mid, out_chs, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv_pw(x)))
        x = self.shuffle(x)
        x = self.act2(self.bn2(self.conv_dw(x)))
        x = self.bn3(self.conv_pwl(x))
        if self.has_skip:
            x = x + shortcut
        return x


class SkipBlock(nn.Module):
    """The ``skip`` candidate: identity, or 1x1 conv + BN + ReLU where the shape changes."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride
        self.conv = (ConvBNReLU(in_chs, out_chs, 1, stride)
                     if shape_changes(in_chs, out_chs, stride) else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def build_block(name: str | CandidateSpec, in_chs: int, out_chs: int, stride: int) -> nn.Module:
    """The registry: one uniform factory ``(name, in, out, stride) -> module``."""
    spec = parse_candidate(name) if isinstance(name, str) else name
    if spec.is_skip:
        return SkipBlock(in_chs, out_chs, stride)
    return CandidateBlock(in_chs, out_chs, stride, spec.kernel, spec.expansion, spec.groups)
