"""The FBNet search loss: cross-entropy weighted by the expected latency.

``mode="mult"`` (the paper, Wu et al. 2019, eq. 2)::

    loss = CE(logits, targets) * alpha * (log LAT) ** beta        # (log LAT)^beta

with alpha = 0.2, beta = 0.6 and LAT the expected latency in MICROSECONDS: alpha and
beta were chosen for that unit, so the table's milliseconds are converted (``unit``).
``mode="add"``: ``CE + lam * LAT`` with LAT in milliseconds by default (lam per ms).
``mode="none"``: plain CE (the latency is still reported when a table is given).

Guard for tiny latencies: ``log LAT`` must be >= 0 for the power; LAT is clamped to at
least e (in the chosen unit), so ``log LAT >= 1``. At realistic latencies (thousands of
microseconds) the clamp never engages and the loss is exactly the paper's; where it does
engage the latency gradient is zero, and the constructor warns when the table's fastest
architecture is below e (usually a wrong ``unit``).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import UNITS
from .table import LatencyTable

__all__ = ["FBNetLoss", "LossParts", "LOSS_MODES", "combine", "objective", "default_unit"]

LOSS_MODES = ("mult", "add", "none")


def default_unit(mode: str) -> str:
    """The unit of LAT inside the formula: "us" for "mult" (the paper's alpha and beta go
    with microseconds), "ms" for "add" (lam per millisecond) and "none"."""
    return "ms" if mode == "add" else "us"


def combine(ce, lat, mode: str, alpha: float, beta: float, lam: float):
    """The loss from CE and LAT (already in the formula's unit), for tensors or floats.

    "mult": ``ce * alpha * log(max(LAT, e)) ** beta``; "add": ``ce + lam * LAT``;
    "none": ``ce``. The one place the formula is written (``FBNetLoss`` and ``objective``
    both call it)."""
    if mode == "mult":
        log = (torch.log(lat.clamp(min=math.e)) if isinstance(lat, Tensor)
               else math.log(max(float(lat), math.e)))
        return ce * alpha * log ** beta
    if mode == "add":
        return ce + lam * lat
    if mode == "none":
        return ce
    raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}")


def objective(ce: float, latency_ms: float, mode: str = "mult", alpha: float = 0.2,
              beta: float = 0.6, lam: float = 0.01, unit: str | None = None) -> float:
    """The search loss of one discrete architecture as a number: its cross-entropy ``ce``
    and its latency ``latency_ms`` (from the table, in ms) put through the same formula
    as ``FBNetLoss`` (LAT converted to ``unit``, default ``default_unit(mode)``).
    Lower is better."""
    unit = unit or default_unit(mode)
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {sorted(UNITS)}, got {unit!r}")
    scale = 1.0 / UNITS[unit]              # ms -> unit, as FBNetLoss.scale
    return float(combine(float(ce), float(latency_ms) * scale, mode, alpha, beta, lam))


class LossParts(NamedTuple):
    """loss (what to backpropagate), ce, and latency (in ``FBNetLoss.unit``, or None)."""

    loss: Tensor
    ce: Tensor
    latency: Tensor | None


class FBNetLoss(nn.Module):
    """``forward(logits, targets, masks) -> loss``; ``parts(...)`` also returns CE and LAT.

    table: a ``LatencyTable`` (needed by "mult" and "add"); space / num_classes: the space
    the masks belong to (default: the one the table was measured for).
    masks: Tensor[L, K] per batch or Tensor[L, N, K] per example (mean over N), e.g.
    ``SuperNet.last_masks``. unit: the unit of LAT inside the formula, default "us" for
    "mult" (the paper's) and "ms" for "add" (lam per millisecond).
    After each call ``self.last`` holds the detached ``LossParts`` for logging.
    """

    def __init__(self, table: LatencyTable | None = None, mode: str = "mult",
                 alpha: float = 0.2, beta: float = 0.6, lam: float = 0.01,
                 unit: str | None = None, space=None, num_classes: int | None = None):
        super().__init__()
        if mode not in LOSS_MODES:
            raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}")
        unit = unit or default_unit(mode)
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {sorted(UNITS)}, got {unit!r}")
        if mode != "none" and table is None:
            raise ValueError(f"mode {mode!r} needs a latency table (table=LatencyTable...); "
                             "use mode='none' for plain cross-entropy")
        if alpha <= 0 or beta <= 0 or lam < 0:
            raise ValueError(f"need alpha > 0, beta > 0, lam >= 0; got {alpha}, {beta}, {lam}")
        self.table, self.mode, self.unit = table, mode, unit
        self.alpha, self.beta, self.lam = float(alpha), float(beta), float(lam)
        self.space, self.num_classes = space, num_classes
        self.scale = 1.0 / UNITS[unit]          # ms -> unit
        self.last: LossParts | None = None
        if table is not None:
            sp, nc = table.resolve_space(space, num_classes)
            table.check(sp, nc)
            fastest = (table.layer_matrix(sp).min(dim=1).values.sum().item()
                       + table.fixed_ms(sp, nc)) * self.scale
            if mode == "mult" and fastest <= math.e:
                warnings.warn(
                    f"the fastest architecture takes {fastest:.3g} {unit}, below e: the loss "
                    f"clamps LAT to >= e {unit}, where its latency gradient is zero; use a "
                    "smaller unit (the paper's alpha and beta go with 'us')", stacklevel=2)

    def latency(self, masks: Tensor) -> Tensor:
        """Expected latency (0-dim tensor) in ``self.unit``, differentiable in the masks."""
        return self.table.expected(masks, self.space, self.num_classes) * self.scale

    def parts(self, logits: Tensor, targets: Tensor, masks: Tensor | None = None) -> LossParts:
        ce = F.cross_entropy(logits, targets)
        lat = None
        if self.table is not None and (masks is not None or self.mode != "none"):
            if masks is None:
                raise ValueError(f"mode {self.mode!r} needs the masks (Tensor[L, K] or "
                                 "Tensor[L, N, K], e.g. SuperNet.last_masks)")
            lat = self.latency(masks)
        loss = combine(ce, lat, self.mode, self.alpha, self.beta, self.lam)
        self.last = LossParts(loss.detach(), ce.detach(), None if lat is None else lat.detach())
        return LossParts(loss, ce, lat)

    def forward(self, logits: Tensor, targets: Tensor, masks: Tensor | None = None) -> Tensor:
        return self.parts(logits, targets, masks).loss

    def extra_repr(self) -> str:
        if self.mode == "mult":
            f = f"CE * {self.alpha} * (log LAT[{self.unit}]) ** {self.beta}, LAT >= e {self.unit}"
        elif self.mode == "add":
            f = f"CE + {self.lam} * LAT[{self.unit}]"
        else:
            f = "CE"
        src = "" if self.table is None else ", table in ms converted to " + self.unit
        return f"mode={self.mode!r}: {f}{src}"
