"""Discrete FBNet networks: ``FBNet`` / ``create_model`` for any architecture (a zoo name,
a file, a string, an ``Architecture``) and their MACs and parameters (``count_costs``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .architecture import resolve_arch
from .blocks import ConvBNReLU, build_block
from .space import conv_out, parse_candidate, shape_changes

__all__ = ["FBNet", "create_model", "LayerCost", "count_costs", "block_cost"]

class FBNet(nn.Module):
    """A discrete FBNet: stem, one candidate block per searchable layer, head, classifier."""

    def __init__(self, arch, num_classes: int = 1000, dropout: float = 0.0):
        super().__init__()
        self.arch = arch = resolve_arch(arch)
        space = arch.space
        self.stem = ConvBNReLU(3, space.stem_out, 3, space.effective_stem_stride)
        self.blocks = nn.Sequential(*[
            build_block(name, l.in_channels, l.out_channels, l.stride)
            for name, l in zip(arch.blocks, space.layers())])
        last = space.layers()[-1].out_channels
        self.head = ConvBNReLU(last, space.head_out, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(space.head_out, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))


def create_model(arch, num_classes: int = 1000, **kw) -> FBNet:
    """Build a zoo name, an architecture file, an ``Architecture`` or a list of 22 names."""
    return FBNet(arch, num_classes, **kw)


@dataclass(frozen=True)
class LayerCost:
    name: str
    block: str
    out_shape: tuple       # (C, H, W) for one image
    macs: int
    params: int


def _conv_macs(c_in, c_out, k, h_out, groups=1) -> int:
    return c_out * (c_in // groups) * k * k * h_out * h_out


def _bn_params(c) -> int:
    return 2 * c


def block_cost(name: str, c_in: int, c_out: int, stride: int, size: int) -> tuple:
    """(MACs, parameters incl. BN) of one candidate at one layer, counted as the paper does."""
    spec = parse_candidate(name)
    h_out = conv_out(size, stride)
    if spec.is_skip:
        if not shape_changes(c_in, c_out, stride):
            return 0, 0
        return _conv_macs(c_in, c_out, 1, h_out), c_in * c_out + _bn_params(c_out)
    mid, g, k = c_in * spec.expansion, spec.groups, spec.kernel
    macs = (_conv_macs(c_in, mid, 1, size, g) + _conv_macs(mid, mid, k, h_out, mid)
            + _conv_macs(mid, c_out, 1, h_out, g))
    params = (mid * c_in // g + mid * k * k + c_out * mid // g
              + _bn_params(mid) * 2 + _bn_params(c_out))
    return macs, params


def count_costs(arch, num_classes: int = 1000) -> list:
    """Per-layer costs (stem, 22 blocks, head, classifier) of one architecture."""
    arch = resolve_arch(arch)
    space = arch.space
    size = conv_out(space.resolution, space.effective_stem_stride)
    stem = space.stem_out
    rows = [LayerCost("stem", "conv3x3", (stem, size, size),
                      _conv_macs(3, stem, 3, size), 3 * 9 * stem + _bn_params(stem))]
    for name, l in zip(arch.blocks, space.layers()):
        macs, params = block_cost(name, l.in_channels, l.out_channels, l.stride, l.in_size)
        rows.append(LayerCost(f"tbs{l.index + 1}", name,
                              (l.out_channels, l.out_size, l.out_size), macs, params))
    last = space.layers()[-1]
    h = last.out_size
    rows.append(LayerCost("head", "conv1x1", (space.head_out, h, h),
                          _conv_macs(last.out_channels, space.head_out, 1, h),
                          last.out_channels * space.head_out + _bn_params(space.head_out)))
    rows.append(LayerCost("fc", "linear", (num_classes, 1, 1), space.head_out * num_classes,
                          space.head_out * num_classes + num_classes))
    return rows
