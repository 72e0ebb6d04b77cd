"""Latency lookup tables (LUTs): per-op latencies of a search space on one device.

A table maps an *op key* (``keys.py``: the op and its shape, so identical shapes in
different layers share one entry) to a latency in milliseconds.

The expected latency of the supernet is linear in the masks, ``sum_l sum_i m_li LUT[l, i]``
plus the fixed stem and head, so it is differentiable in theta (``expected``).
The file formats live in ``formats.py``, measuring in ``measuring.py``, validation in
``validation.py``.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ..nn.architecture import resolve_arch
from ..nn.space import SearchSpace
from . import formats
from .formats import Entry
from .keys import (arch_keys, block_keys, check_key, head_key, layer_keys, required_keys,
                   stem_key)

__all__ = ["LatencyTable"]


class LatencyTable:
    """Per-op latencies (ms) of one device, with how they were measured.

    ``meta`` holds the measurement settings (device, runtime, torch version, dtype,
    batch, threads, method, ...), ``space`` the search space measured (a dict, or None
    for imported tables without one), ``calibration`` an optional whole-network fit
    ``{"scale": a, ...}`` applied by ``value`` (see ``measure.calibrate``).
    """

    def __init__(self, entries: dict, meta: dict | None = None, space: dict | None = None,
                 num_classes: int | None = None, calibration: dict | None = None,
                 warnings: list | None = None):
        self.entries = {}
        for k, e in entries.items():
            check_key(k)
            self.entries[k] = e if isinstance(e, Entry) else Entry.parse(e, k)
        self.meta = dict(meta or {})
        self.space_dict = space
        self.num_classes = num_classes
        self.calibration = calibration
        self.warnings = list(warnings or [])
        self._cache = {}

    # -- files (formats.py) ----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        """Read our JSON (``*.json``) or a plain CSV table (any other extension)."""
        return cls(**formats.load(path))

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON, or the plain CSV format when ``path`` ends in ``.csv``."""
        formats.save(self, path)

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        return cls(**formats.from_dict(d))

    def to_dict(self) -> dict:
        return formats.to_dict(self)

    @classmethod
    def from_csv(cls, text: str) -> "LatencyTable":
        """Parse the plain CSV format (docs/latency.md): ``op,latency_<unit>`` rows."""
        return cls(**formats.from_csv(text))

    def to_csv(self, unit: str = "ms") -> str:
        """The plain CSV form (calibration already applied to the latencies)."""
        return formats.to_csv(self, unit)

    # -- lookups ---------------------------------------------------------------------------
    @property
    def space_dict(self) -> dict | None:
        return self._space_dict

    @space_dict.setter
    def space_dict(self, d: dict | None) -> None:
        self._space_dict = d
        self._space = None if d is None else SearchSpace.from_dict(d)

    @property
    def space(self) -> SearchSpace | None:
        """The search space the table was measured for (None if not recorded)."""
        return self._space

    def value(self, key: str) -> float:
        """Latency of one op in ms: its median, times the calibration's scales, plus its
        correction (``entry_ms``) where the table was fitted entry by entry."""
        try:
            e = self.entries[key]
        except KeyError:
            raise ValueError(self._missing_message([key])) from None
        if not self.calibration:
            return e.median
        cal = self.calibration
        types = cal.get("type_scales") or {}
        return (e.median * cal["scale"] * types.get(key.split(":", 1)[0], 1.0)
                + (cal.get("entry_ms") or {}).get(key, 0.0))

    def resolve_space(self, space: SearchSpace | None = None,
                      num_classes: int | None = None) -> tuple:
        """(space, num_classes): the given ones, else those the table records (1000 classes)."""
        if space is None:
            space = self.space
            if space is None:
                raise ValueError("this table records no search space: pass space=...")
        nc = num_classes if num_classes is not None else (self.num_classes or 1000)
        return space, nc

    def missing(self, space: SearchSpace | None = None, num_classes: int | None = None) -> list:
        space, nc = self.resolve_space(space, num_classes)
        return [k for k in required_keys(space, nc) if k not in self.entries]

    def covers(self, space: SearchSpace | None = None, num_classes: int | None = None) -> bool:
        return not self.missing(space, num_classes)

    def check(self, space: SearchSpace | None = None, num_classes: int | None = None) -> None:
        """Raise a ValueError naming the missing entries if the table does not cover ``space``."""
        space, nc = self.resolve_space(space, num_classes)
        missing = self.missing(space, nc)
        if missing:
            raise ValueError(self._missing_message(missing, space))

    def _missing_message(self, missing, space=None) -> str:
        where = ""
        if space is not None:
            layers = [l.index + 1 for l, row in zip(space.layers(), layer_keys(space))
                      if missing[0] in row]
            if layers:
                where = f" (needed by searchable layer(s) {', '.join(map(str, layers))})"
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return (f"the latency table has no entry {missing[0]!r}{where}{more}; measure it "
                "for this search space (fbnet-fast lut measure with the same --resolution, "
                "--width and --num-classes) or add the row to your CSV")

    def fixed_ms(self, space: SearchSpace | None = None, num_classes: int | None = None) -> float:
        """Latency of the fixed parts (stem, head + pool + fc) in ms, calibration included."""
        space, nc = self.resolve_space(space, num_classes)
        self.check(space, nc)
        offset = self.calibration.get("offset_ms", 0.0) if self.calibration else 0.0
        return self.value(stem_key(space)) + self.value(head_key(space, nc)) + offset

    def layer_matrix(self, space: SearchSpace | None = None, dtype=torch.float32,
                     device=None) -> Tensor:
        """Tensor[L, K]: latency in ms of candidate k at searchable layer l."""
        space, nc = self.resolve_space(space, None)
        missing = [k for k in block_keys(space) if k not in self.entries]
        if missing:
            raise ValueError(self._missing_message(missing, space))
        rows = [[self.value(k) for k in row] for row in layer_keys(space)]
        return torch.tensor(rows, dtype=dtype, device=device)

    # -- latency of architectures --------------------------------------------------------
    def latency(self, arch, num_classes: int | None = None) -> float:
        """Latency in ms of one discrete architecture (any form ``create_model`` accepts),
        stem and head included."""
        arch = resolve_arch(arch)
        total = self.fixed_ms(arch.space, num_classes)
        for key in arch_keys(arch)[1:-1]:
            total += self.value(key)
        return total

    def expected(self, masks: Tensor, space: SearchSpace | None = None,
                 num_classes: int | None = None) -> Tensor:
        """Expected latency in ms, ``sum_l sum_i m_li LUT[l, i] + fixed``, differentiable.

        masks: Tensor[L, K] (one mask per batch) or Tensor[L, N, K] (per example; the
        mean over the N examples is used). Returns a 0-dim tensor of masks' dtype.
        """
        space, nc = self.resolve_space(space, num_classes)
        if masks.dim() == 3:
            masks = masks.mean(dim=1)
        L, K = space.num_layers, space.num_candidates
        if masks.dim() != 2 or tuple(masks.shape) != (L, K):
            raise ValueError(f"masks must be Tensor[{L}, {K}] or Tensor[{L}, N, {K}] for this "
                             f"space, got {tuple(masks.shape)}")
        ck = (space, nc, masks.dtype, masks.device)
        if ck not in self._cache:
            self._cache[ck] = (self.layer_matrix(space, masks.dtype, masks.device),
                               self.fixed_ms(space, nc))
        mat, fixed = self._cache[ck]
        return (masks * mat).sum() + fixed

    # -- checks and display ------------------------------------------------------------------
    def noisy_keys(self) -> list:
        return [k for k, e in self.entries.items() if e.flags]

    def __repr__(self) -> str:
        dev = self.meta.get("device", {})
        dev = dev.get("name", dev) if isinstance(dev, dict) else dev
        return (f"LatencyTable({len(self.entries)} entries, unit=ms, device={dev!r}, "
                f"method={self.meta.get('method')!r}, batch={self.meta.get('batch')}, "
                f"threads={self.meta.get('threads')}, calibrated={self.calibration is not None})")
