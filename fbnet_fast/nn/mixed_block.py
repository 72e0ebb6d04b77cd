"""``MixedBlock``: one searchable layer, ``y = sum_i w_i * block_i(x)``.

The parameters are stored by role, concatenated over the conv candidates in candidate
order (``pw1_weight`` holds every candidate's first 1x1 weight, ``bn1_*`` every
candidate's first BN, and so on), so a fused backend reads them as views without
gathering nine modules. ``MixedLayout`` (``layout.py``) says where each candidate's
slice is; ``block(i)`` turns a slice back into a standalone module with the trained
weights. The forward goes through the backend registry (docs/architecture.md).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..backends import registry
from ..backends.reference import run_candidate
from .blocks import CandidateBlock, SkipBlock
from .layout import MixedLayout
from .space import CANDIDATES

__all__ = ["MixedBlock"]

def _bn_params(module: nn.Module, prefix: str, channels: int) -> None:
    module.register_parameter(f"{prefix}_weight", nn.Parameter(torch.ones(channels)))
    module.register_parameter(f"{prefix}_bias", nn.Parameter(torch.zeros(channels)))
    module.register_buffer(f"{prefix}_running_mean", torch.zeros(channels))
    module.register_buffer(f"{prefix}_running_var", torch.ones(channels))


def _uniform_fan_in(w: Tensor, fan_in: int) -> None:
    # nn.Conv2d's default initialisation, slice by slice.
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        w.uniform_(-bound, bound)


class MixedBlock(nn.Module):
    """One FBNet supernet layer mixing candidate blocks by a mask.

    Args:
        in_channels, out_channels, stride: the layer's shape.
        candidates: block names (default: the paper's nine).
        backend: ``"auto"``, ``"reference"`` or a fused backend (see ``fbnet_fast.backends``).

    ``forward(x, weights)``: x (Tensor[N, C_in, H, W]), weights (Tensor[K] per batch or
    Tensor[N, K] per example); returns Tensor[N, C_out, H', W'] = sum_i w_i * block_i(x).
    ``forward(x, i)`` with an int runs candidate i alone.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int,
                 candidates: Sequence[str] | None = None, backend: str = "auto"):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        candidates = tuple(CANDIDATES if candidates is None else candidates)
        self.layout = MixedLayout.build(in_channels, out_channels, stride, candidates)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.candidates = candidates
        self.backend = registry.check_name(backend)
        L = self.layout
        self.pw1_weight = nn.Parameter(torch.empty(L.pw1_numel))
        self.dw_weight = nn.Parameter(torch.empty(L.dw_numel))
        self.pw2_weight = nn.Parameter(torch.empty(L.pw2_numel))
        _bn_params(self, "bn1", L.total_mid)
        _bn_params(self, "bn2", L.total_mid)
        _bn_params(self, "bn3", len(L.slots) * out_channels)
        if L.skip_index >= 0 and L.skip_is_conv:
            self.skip_weight = nn.Parameter(torch.empty(out_channels * in_channels))
            _bn_params(self, "skip_bn", out_channels)
        else:
            self.skip_weight = None
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        L = self.layout
        for s in L.slots:
            _uniform_fan_in(L.pw1(self.pw1_weight, s), self.in_channels // s.spec.groups)
            _uniform_fan_in(L.dw(self.dw_weight, s), s.spec.kernel ** 2)
            _uniform_fan_in(L.pw2(self.pw2_weight, s), s.mid // s.spec.groups)
        if self.skip_weight is not None:
            _uniform_fan_in(self.skip_weight, self.in_channels)

    @property
    def num_candidates(self) -> int:
        return len(self.candidates)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
                f"candidates={list(self.candidates)}, backend={self.backend!r}")

    def check_weights(self, x: Tensor, weights: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MixedBlock({self.in_channels}->{self.out_channels}) expects input "
                f"Tensor[N, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        k = self.num_candidates
        if not isinstance(weights, Tensor):
            raise ValueError("weights must be a Tensor[K] or Tensor[N, K] (or an int index)")
        if weights.shape not in ((k,), (x.shape[0], k)):
            raise ValueError(
                f"weights must have shape [{k}] (per batch) or [{x.shape[0]}, {k}] (per "
                f"example) for {k} candidates, got {tuple(weights.shape)}")

    def forward(self, x: Tensor, weights) -> Tensor:
        if isinstance(weights, int):
            if not 0 <= weights < self.num_candidates:
                raise ValueError(
                    f"candidate index {weights} out of range for {self.num_candidates} candidates")
            return run_candidate(self, x, weights)
        self.check_weights(x, weights)
        if self.training:
            self.num_batches_tracked.add_(1)
        return registry.resolve(self.backend, x.device)(self, x, weights)

    # -- export -----------------------------------------------------------------------
    @torch.no_grad()
    def block(self, i: int) -> nn.Module:
        """Candidate ``i`` as a standalone module holding its trained weights and BN state."""
        L = self.layout
        like = dict(device=self.pw1_weight.device, dtype=self.pw1_weight.dtype)
        if i == L.skip_index:
            out = SkipBlock(self.in_channels, self.out_channels, self.stride).to(**like)
            if L.skip_is_conv:
                conv, bn = out.conv[0], out.conv[1]
                conv.weight.copy_(self.skip_weight.view_as(conv.weight))
                _copy_bn(bn, self, "skip_bn", slice(None))
        else:
            s = next(s for s in L.slots if s.index == i)
            out = CandidateBlock(self.in_channels, self.out_channels, self.stride,
                                 s.spec.kernel, s.spec.expansion, s.spec.groups).to(**like)
            out.conv_pw.weight.copy_(L.pw1(self.pw1_weight, s))
            out.conv_dw.weight.copy_(L.dw(self.dw_weight, s))
            out.conv_pwl.weight.copy_(L.pw2(self.pw2_weight, s))
            mids = slice(s.mid_offset, s.mid_offset + s.mid)
            _copy_bn(out.bn1, self, "bn1", mids)
            _copy_bn(out.bn2, self, "bn2", mids)
            _copy_bn(out.bn3, self, "bn3", slice(s.out_offset, s.out_offset + self.out_channels))
        return out.train(self.training)

    @torch.no_grad()
    def load_block(self, i: int, block: nn.Module) -> None:
        """Inverse of ``block(i)``: copy a standalone candidate's weights into slot ``i``."""
        L = self.layout
        if i == L.skip_index:
            if L.skip_is_conv:
                self.skip_weight.copy_(block.conv[0].weight.flatten())
                _load_bn(block.conv[1], self, "skip_bn", slice(None))
            return
        s = next(s for s in L.slots if s.index == i)
        L.pw1(self.pw1_weight, s).copy_(block.conv_pw.weight)
        L.dw(self.dw_weight, s).copy_(block.conv_dw.weight)
        L.pw2(self.pw2_weight, s).copy_(block.conv_pwl.weight)
        mids = slice(s.mid_offset, s.mid_offset + s.mid)
        _load_bn(block.bn1, self, "bn1", mids)
        _load_bn(block.bn2, self, "bn2", mids)
        _load_bn(block.bn3, self, "bn3", slice(s.out_offset, s.out_offset + self.out_channels))


_BN_FIELDS = (("weight", "weight"), ("bias", "bias"),
              ("running_mean", "running_mean"), ("running_var", "running_var"))


def _copy_bn(bn: nn.BatchNorm2d, m: MixedBlock, prefix: str, sl: slice) -> None:
    for a, b in _BN_FIELDS:
        getattr(bn, a).copy_(getattr(m, f"{prefix}_{b}")[sl])
    bn.num_batches_tracked.copy_(m.num_batches_tracked)


def _load_bn(bn: nn.BatchNorm2d, m: MixedBlock, prefix: str, sl: slice) -> None:
    for a, b in _BN_FIELDS:
        getattr(m, f"{prefix}_{b}")[sl].copy_(getattr(bn, a))
