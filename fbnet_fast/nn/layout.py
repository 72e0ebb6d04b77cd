"""Where each candidate of a ``MixedBlock`` lives inside its role-concatenated parameters.

A leaf of the ``nn`` layer: ``MixedBlock`` builds its parameters from it and the fused
backends (``backends/plan.py``) derive their plan from it, without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .space import CandidateSpec, check_candidates, shape_changes

__all__ = ["MixedLayout", "ConvSlot", "BN_EPS", "BN_MOMENTUM"]

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

    # The layout as one string (a custom op's argument) and back.
    def key(self) -> str:
        """``"C_in,C_out,stride:cand1,cand2,..."``."""
        return (f"{self.in_channels},{self.out_channels},{self.stride}:"
                f"{','.join(self.candidates)}")

    @classmethod
    def from_key(cls, key: str) -> "MixedLayout":
        shape, _, names = key.partition(":")
        c_in, c_out, stride = map(int, shape.split(","))
        return cls.build(c_in, c_out, stride, tuple(names.split(",")))

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
