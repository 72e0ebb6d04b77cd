"""``MixedBlock``: one searchable layer, ``y = sum_i w_i * block_i(x)``.

The parameters are stored by role, concatenated over the conv candidates in candidate
order (``pw1_weight`` holds every candidate's first 1x1 weight, ``bn1_*`` every
candidate's first BN, and so on), so a fused backend reads them as views without
gathering nine modules. ``MixedLayout`` says where each candidate's slice is;
``block(i)`` turns a slice back into a standalone module with the trained weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .blocks import CandidateBlock, SkipBlock, channel_shuffle
from .space import CANDIDATES, CandidateSpec, check_candidates, shape_changes

__all__ = ["MixedBlock", "MixedLayout", "ConvSlot", "mixed_block_reference"]

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class ConvSlot:
    """Where one conv candidate lives inside the role-concatenated parameters."""

    index: int          # position in the candidate list (mask column)
    spec: CandidateSpec
    mid: int            # E * C_in
    mid_offset: int     # first channel in bn1_* / bn2_* / the expanded tensor
    pw1_offset: int     # first element in pw1_weight (flat, [mid, C_in/G])
    dw_offset: int      # first element in dw_weight (flat, [mid, K*K])
    pw2_offset: int     # first element in pw2_weight (flat, [C_out, mid/G])
    out_offset: int     # first channel in bn3_* ([n_conv * C_out])


@dataclass(frozen=True)
class MixedLayout:
    in_channels: int
    out_channels: int
    stride: int
    candidates: tuple
    slots: tuple         # ConvSlot per conv candidate, in candidate order
    skip_index: int      # mask column of 'skip', or -1
    skip_is_conv: bool
    residual: bool       # conv candidates add x (stride 1 and C_in == C_out)
    total_mid: int
    pw1_numel: int
    dw_numel: int
    pw2_numel: int

    @classmethod
    def build(cls, in_channels, out_channels, stride, candidates) -> "MixedLayout":
        specs = check_candidates(candidates, in_channels, out_channels)
        slots, mid_off, o1, od, o2 = [], 0, 0, 0, 0
        skip_index = -1
        for i, spec in enumerate(specs):
            if spec.is_skip:
                skip_index = i
                continue
            mid = in_channels * spec.expansion
            slots.append(ConvSlot(i, spec, mid, mid_off, o1, od, o2,
                                  len(slots) * out_channels))
            mid_off += mid
            o1 += mid * in_channels // spec.groups
            od += mid * spec.kernel * spec.kernel
            o2 += out_channels * mid // spec.groups
        changes = shape_changes(in_channels, out_channels, stride)
        return cls(in_channels, out_channels, stride, tuple(candidates), tuple(slots),
                   skip_index, changes, not changes, mid_off, o1, od, o2)

    # Views of one slot's weights in their conv shapes.
    def pw1(self, w: Tensor, s: ConvSlot) -> Tensor:
        n = s.mid * self.in_channels // s.spec.groups
        return w[s.pw1_offset:s.pw1_offset + n].view(s.mid, self.in_channels // s.spec.groups, 1, 1)

    def dw(self, w: Tensor, s: ConvSlot) -> Tensor:
        k = s.spec.kernel
        return w[s.dw_offset:s.dw_offset + s.mid * k * k].view(s.mid, 1, k, k)

    def pw2(self, w: Tensor, s: ConvSlot) -> Tensor:
        n = self.out_channels * s.mid // s.spec.groups
        return w[s.pw2_offset:s.pw2_offset + n].view(self.out_channels, s.mid // s.spec.groups, 1, 1)


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
        self.backend = backends.check_name(backend)
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
        return backends.resolve(self.backend, x.device)(self, x, weights)

    # -- export -----------------------------------------------------------------------
    @torch.no_grad()
    def block(self, i: int) -> nn.Module:
        """Candidate ``i`` as a standalone module holding its trained weights and BN state."""
        name = self.candidates[i]
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


# --- the reference implementation (plain PyTorch ops) ------------------------------

def _bn(m: MixedBlock, prefix: str, x: Tensor, sl: slice) -> Tensor:
    return F.batch_norm(
        x, getattr(m, f"{prefix}_running_mean")[sl], getattr(m, f"{prefix}_running_var")[sl],
        getattr(m, f"{prefix}_weight")[sl], getattr(m, f"{prefix}_bias")[sl],
        m.training, BN_MOMENTUM, BN_EPS)


def _conv_candidate(m: MixedBlock, x: Tensor, s: ConvSlot) -> Tensor:
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


def _skip_candidate(m: MixedBlock, x: Tensor) -> Tensor:
    if not m.layout.skip_is_conv:
        return x
    w = m.skip_weight.view(m.out_channels, m.in_channels, 1, 1)
    return torch.relu(_bn(m, "skip_bn", F.conv2d(x, w, stride=m.stride), slice(None)))


def run_candidate(m: MixedBlock, x: Tensor, i: int) -> Tensor:
    """Candidate ``i`` alone (a sampled architecture runs only its chosen block)."""
    if i == m.layout.skip_index:
        return _skip_candidate(m, x)
    return _conv_candidate(m, x, next(s for s in m.layout.slots if s.index == i))


def _mask_column(weights: Tensor, i: int) -> Tensor:
    w = weights[..., i]
    return w.view(-1, 1, 1, 1) if w.dim() == 1 else w


def mixed_block_reference(m: MixedBlock, x: Tensor, weights: Tensor) -> Tensor:
    """Every candidate runs and keeps its activations: the plain supernet."""
    y = None
    for i in range(m.num_candidates):
        term = _mask_column(weights, i) * run_candidate(m, x, i)
        y = term if y is None else y + term
    return y
