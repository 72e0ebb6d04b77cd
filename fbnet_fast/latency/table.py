"""Latency lookup tables (LUTs): per-op latencies of a search space on one device.

A table maps an *op key* (``keys.py``: the op and its shape, so identical shapes in
different layers share one entry) to a latency in milliseconds.

The expected latency of the supernet is linear in the masks, ``sum_l sum_i m_li LUT[l, i]``
plus the fixed stem and head, so it is differentiable in theta (``expected``).
Measuring lives in ``measure.py``, validation in ``validate.py``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..nn.architecture import resolve_arch
from ..nn.space import SearchSpace, parse_candidate
from .keys import (block_key, check_key, head_key, layer_keys, parse_block_key, required_keys,
                   stem_key)

__all__ = ["LatencyTable", "Entry", "SCHEMA", "UNITS", "order_violations"]

SCHEMA = "fbnet_fast.lut/1"
UNITS = {"s": 1000.0, "ms": 1.0, "us": 1e-3}   # factor to milliseconds

# --- entries ------------------------------------------------------------------------

@dataclass
class Entry:
    """One op's latency statistics in milliseconds.

    ``spread`` is the interquartile range over the median (0.1 = the middle half of the
    runs lies within 10 % of the median); ``flags`` lists warnings (``noisy``,
    ``order: ...``).
    """

    median: float
    mean: float | None = None
    spread: float | None = None
    count: int | None = None
    flags: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {"median": self.median, "mean": self.mean, "spread": self.spread,
             "count": self.count}
        if self.flags:
            d["flags"] = list(self.flags)
        return d


def _number(value, what: str, allow_none=False, integer=False):
    """Parse a latency or statistic; reject NaN, infinity and negatives by name."""
    if value is None or value == "":
        if allow_none:
            return None
        raise ValueError(f"{what} is missing")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} is {value!r}: latencies must be finite numbers; "
                         "re-measure this entry")
    if v < 0:
        raise ValueError(f"{what} is negative ({v}): latencies must be >= 0")
    return int(v) if integer else v


def _entry_from(d, key: str, factor: float) -> Entry:
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        d = {"median": d}
    if not isinstance(d, dict):
        raise ValueError(f"entry {key!r} must be an object with 'median' (and optionally "
                         f"'mean', 'spread', 'count', 'flags'), got {d!r}")
    unknown = set(d) - {"median", "mean", "spread", "count", "flags"}
    if unknown:
        raise ValueError(f"entry {key!r} has unknown field(s) {sorted(unknown)}")
    med = _number(d.get("median"), f"entry {key!r} field 'median'")
    mean = _number(d.get("mean"), f"entry {key!r} field 'mean'", allow_none=True)
    spread = _number(d.get("spread"), f"entry {key!r} field 'spread'", allow_none=True)
    count = _number(d.get("count"), f"entry {key!r} field 'count'", allow_none=True,
                    integer=True)
    flags = d.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise ValueError(f"entry {key!r} field 'flags' must be a list of strings")
    return Entry(med * factor, None if mean is None else mean * factor, spread, count,
                 list(flags))


# --- ordering checks ------------------------------------------------------------------

def order_violations(values: dict, tol: float = 0.03) -> list:
    """Pairs that break obvious orderings at one layer shape, as ``(fast, slow, ratio)``.

    Expected: for equal kernel and groups, e1 <= e3 <= e6; for equal expansion and groups,
    k3 <= k5. A pair is reported when the op expected to be slower is faster by more
    than ``tol`` (relative), i.e. ``values[slow] < (1 - tol) * values[fast]``.
    """
    by_shape = {}
    for key, v in values.items():
        p = parse_block_key(key)
        if p and p[0] != "skip":
            spec = parse_candidate(p[0])
            by_shape.setdefault(p[1:], {})[(spec.kernel, spec.expansion, spec.groups)] = key
    out = []
    for shape, ops in by_shape.items():
        for (k, e, g), key in ops.items():
            bigger = [(k, e2, g) for e2 in sorted({o[1] for o in ops}) if e2 > e][:1]
            bigger += [(k2, e, g) for k2 in sorted({o[0] for o in ops}) if k2 > k][:1]
            for b in bigger:
                if b in ops and values[ops[b]] < (1 - tol) * values[key]:
                    out.append((key, ops[b], values[ops[b]] / values[key]))
    return out


# --- the table --------------------------------------------------------------------------

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
            self.entries[k] = e if isinstance(e, Entry) else _entry_from(e, k, 1.0)
        self.meta = dict(meta or {})
        self.space_dict = space
        self.num_classes = num_classes
        self.calibration = calibration
        self.warnings = list(warnings or [])
        self._cache = {}

    # -- construction ------------------------------------------------------------------
    @classmethod
    def measure(cls, space: SearchSpace | None = None, device="cpu", batch: int = 1,
                threads: int | None = None, **kw) -> "LatencyTable":
        """Measure every op of ``space`` on ``device``; see ``measure.measure``."""
        from .latency_measure import measure
        return measure(space, device=device, batch=batch, threads=threads, **kw)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyTable":
        """Read our JSON (``*.json``) or a plain CSV table (any other extension)."""
        path = os.fspath(path)
        try:
            with open(path, newline="") as f:
                text = f.read()
        except FileNotFoundError:
            raise ValueError(f"latency table {path!r} does not exist") from None
        if path.endswith(".json") or text.lstrip().startswith("{"):
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"latency table {path!r} is not valid JSON: {e}") from None
            try:
                return cls.from_dict(d)
            except ValueError as e:
                raise ValueError(f"latency table {path!r}: {e}") from None
        try:
            return cls.from_csv(text)
        except ValueError as e:
            raise ValueError(f"latency table {path!r}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON, or the plain CSV format when ``path`` ends in ``.csv``."""
        path = os.fspath(path)
        with open(path, "w", newline="") as f:
            if path.endswith(".csv"):
                f.write(self.to_csv())
            else:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "unit": "ms", **self.meta, "space": self.space_dict,
                "num_classes": self.num_classes, "calibration": self.calibration,
                "warnings": self.warnings,
                "entries": {k: e.to_dict() for k, e in self.entries.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyTable":
        if not isinstance(d, dict):
            raise ValueError("a latency table must be a JSON object")
        schema = d.get("schema")
        if schema != SCHEMA:
            raise ValueError(f"unsupported schema {schema!r} (field 'schema'); this version "
                             f"reads {SCHEMA!r}: re-measure the table or import it as CSV")
        unit = d.get("unit")
        if unit not in UNITS:
            raise ValueError(f"field 'unit' must be one of {sorted(UNITS)}, got {unit!r}")
        entries = d.get("entries")
        if not isinstance(entries, dict) or not entries:
            raise ValueError("field 'entries' must be a non-empty object {op key: entry}")
        parsed = {}
        for k, e in entries.items():
            check_key(k)
            parsed[k] = _entry_from(e, k, UNITS[unit])
        space = d.get("space")
        if space is not None:
            SearchSpace.from_dict(space)  # fail early on a bad space
        cal = d.get("calibration")
        if cal is not None:
            if not isinstance(cal, dict):
                raise ValueError("field 'calibration' must be an object or null")
            s = _number(cal.get("scale"), "field 'calibration.scale'")
            if s == 0:
                raise ValueError("field 'calibration.scale' must be > 0")
        nc = d.get("num_classes")
        meta = {k: v for k, v in d.items() if k not in
                {"schema", "unit", "entries", "space", "num_classes", "calibration",
                 "warnings"}}
        return cls(parsed, meta, space, None if nc is None else int(nc), cal,
                   d.get("warnings") or [])

    # -- CSV -----------------------------------------------------------------------------
    @classmethod
    def from_csv(cls, text: str) -> "LatencyTable":
        """Parse the plain CSV format (docs/latency.md): ``op,latency_<unit>`` rows."""
        meta, rows = {}, []
        for line in text.splitlines():
            s = line.strip()
            if s.startswith("#"):
                m = re.match(r"#\s*([A-Za-z_]+)\s*:\s*(.*)$", s)
                if m:
                    meta[m.group(1)] = m.group(2).strip()
            elif s:
                rows.append(line)
        if not rows:
            raise ValueError("the CSV has no header line; expected 'op,latency_ms' "
                             "(or latency_us / latency_s)")
        reader = csv.reader(io.StringIO("\n".join(rows)))
        header = [h.strip() for h in next(reader)]
        lat_cols = [h for h in header if h.startswith("latency_")]
        if not header or header[0] != "op" or len(lat_cols) != 1 \
                or lat_cols[0][len("latency_"):] not in UNITS:
            raise ValueError(f"CSV header {','.join(header)!r} must start with 'op' and "
                             "name exactly one latency column with its unit: latency_ms, "
                             "latency_us or latency_s")
        unit = lat_cols[0][len("latency_"):]
        col = header.index(lat_cols[0])
        opt = {n: header.index(n) for n in ("spread", "count") if n in header}
        entries = {}
        for n, row in enumerate(reader, start=2):
            if len(row) < len(header):
                raise ValueError(f"CSV data row {n - 1} ({','.join(row)!r}) has "
                                 f"{len(row)} columns, the header {len(header)}")
            key = row[0].strip()
            check_key(key)
            if key in entries:
                raise ValueError(f"op {key!r} appears twice in the CSV")
            d = {"median": row[col].strip() or None}
            for name, i in opt.items():
                d[name] = row[i].strip() or None
            try:
                entries[key] = _entry_from(
                    {"median": _number(d["median"], f"latency of op {key!r}"),
                     "spread": _number(d.get("spread"), f"spread of op {key!r}", True),
                     "count": _number(d.get("count"), f"count of op {key!r}", True, True)},
                    key, UNITS[unit])
            except ValueError as e:
                raise ValueError(f"CSV data row {n - 1}: {e}") from None
        if not entries:
            raise ValueError("the CSV has a header but no op rows")
        space = None
        if "space" in meta:
            try:
                space = json.loads(meta.pop("space"))
            except json.JSONDecodeError as e:
                raise ValueError(f"'# space:' metadata must be a JSON object: {e}") from None
            SearchSpace.from_dict(space)
        nc = meta.pop("num_classes", None)
        for k in ("batch", "threads"):
            if k in meta:
                try:
                    meta[k] = int(meta[k])
                except ValueError:
                    raise ValueError(f"'# {k}:' metadata must be an integer") from None
        meta.setdefault("method", "imported")
        meta["source_unit"] = unit
        return cls(entries, meta, space, None if nc is None else int(nc))

    def to_csv(self, unit: str = "ms") -> str:
        """The plain CSV form (calibration already applied to the latencies)."""
        out = io.StringIO()
        for k in ("device", "runtime", "dtype", "batch", "threads"):
            if k in self.meta:
                v = self.meta[k]
                out.write(f"# {k}: {v['name'] if isinstance(v, dict) else v}\n")
        if self.space_dict is not None:
            out.write(f"# space: {json.dumps(self.space_dict)}\n")
        if self.num_classes is not None:
            out.write(f"# num_classes: {self.num_classes}\n")
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["op", f"latency_{unit}", "spread", "count"])
        for k, e in self.entries.items():
            w.writerow([k, repr(self.value(k) / UNITS[unit]),
                        "" if e.spread is None else repr(e.spread),
                        "" if e.count is None else e.count])
        return out.getvalue()

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
        """Latency of one op in ms (median, times the calibration scale if any)."""
        try:
            e = self.entries[key]
        except KeyError:
            raise ValueError(self._missing_message([key])) from None
        scale = self.calibration["scale"] if self.calibration else 1.0
        return e.median * scale

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
        missing = self.missing(space, num_classes)
        if missing:
            raise ValueError(self._missing_message(missing, self.resolve_space(space, num_classes)[0]))

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
        missing = [k for row in layer_keys(space) for k in row if k not in self.entries]
        if missing:
            raise ValueError(self._missing_message(missing, space))
        rows = [[self.value(k) for k in row] for row in layer_keys(space)]
        return torch.tensor(rows, dtype=dtype, device=device)

    # -- latency of architectures --------------------------------------------------------
    def latency(self, arch, num_classes: int | None = None) -> float:
        """Latency in ms of one discrete architecture (any form ``create_model`` accepts),
        stem and head included."""
        arch = resolve_arch(arch)
        space = arch.space
        total = self.fixed_ms(space, num_classes)
        for name, l in zip(arch.blocks, space.layers()):
            total += self.value(block_key(name, l.in_channels, l.out_channels, l.stride,
                                          l.in_size))
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
