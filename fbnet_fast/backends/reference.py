"""The reference MixedBlock backend: every candidate runs with plain PyTorch ops and keeps
its activations, as the paper's supernet does. The truth every fused backend is tested
against, and the path for a single candidate (``run_candidate``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.blocks import channel_shuffle
from ..nn.layout import BN_EPS, BN_MOMENTUM, ConvSlot

__all__ = ["mixed_block_forward", "run_candidate"]


def _bn(m, prefix: str, x: Tensor, sl: slice) -> Tensor:
    return F.batch_norm(
        x, getattr(m, f"{prefix}_running_mean")[sl], getattr(m, f"{prefix}_running_var")[sl],
        getattr(m, f"{prefix}_weight")[sl], getattr(m, f"{prefix}_bias")[sl],
        m.training, BN_MOMENTUM, BN_EPS)


def _conv_candidate(m, x: Tensor, s: ConvSlot) -> Tensor:
    L = m.layout
    g, k = s.spec.groups, s.spec.kernel
    mids = slice(s.mid_offset, s.mid_offset + s.mid)
    h = F.conv2d(x, L.pw1(m.pw1_weight, s), groups=g)
    h = torch.relu(_bn(m, "bn1", h, mids))
    h = channel_shuffle(h, g)
    h = F.conv2d(h, L.dw(m.dw_weight, s), stride=m.stride, padding=k // 2, groups=s.mid)
    h = torch.relu(_bn(m, "bn2", h, mids))
    y = F.conv2d(h, L.pw2(m.pw2_weight, s), groups=g)
    y = _bn(m, "bn3", y, slice(s.out_offset, s.out_offset + m.out_channels))
    return y + x if L.residual else y


def _skip_candidate(m, x: Tensor) -> Tensor:
    if not m.layout.skip_is_conv:
        return x
    w = m.skip_weight.view(m.out_channels, m.in_channels, 1, 1)
    return torch.relu(_bn(m, "skip_bn", F.conv2d(x, w, stride=m.stride), slice(None)))


def run_candidate(m, x: Tensor, i: int) -> Tensor:
    """Candidate ``i`` alone (a sampled architecture runs only its chosen block)."""
    if i == m.layout.skip_index:
        return _skip_candidate(m, x)
    return _conv_candidate(m, x, next(s for s in m.layout.slots if s.index == i))


def _mask_column(weights: Tensor, i: int) -> Tensor:
    w = weights[..., i]
    return w.view(-1, 1, 1, 1) if w.dim() == 1 else w


def mixed_block_forward(m, x: Tensor, weights: Tensor) -> Tensor:
    """Every candidate runs and keeps its activations: the plain supernet."""
    y = None
    for i in range(m.num_candidates):
        term = _mask_column(weights, i) * run_candidate(m, x, i)
        y = term if y is None else y + term
    return y
