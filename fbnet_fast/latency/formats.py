"""The files a latency table lives in: our JSON and the plain CSV (docs/latency.md).

Readers return the parts of a table as the keyword arguments of ``LatencyTable`` and
writers take the table, so this module never imports ``table.py``: the table's
``load``/``save``/``from_dict``/``to_dict``/``from_csv``/``to_csv`` delegate here.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field

from ..nn.space import SearchSpace
from .keys import check_key

__all__ = ["Entry", "SCHEMA", "UNITS", "load", "save", "from_dict", "to_dict", "from_csv",
           "to_csv"]

SCHEMA = "fbnet_fast.lut/1"
UNITS = {"s": 1000.0, "ms": 1.0, "us": 1e-3}   # factor to milliseconds


@dataclass
class Entry:
    """One op's latency statistics in milliseconds.

    ``spread`` is the interquartile range over the median (0.1 = the middle half of the
    runs lies within 10 % of the median); ``flags`` lists warnings (``noisy``,
    ``order: ...``); ``ci`` the half-width of the 95 % confidence interval of the median
    over the median (0.02 = known within 2 %; absent in older tables).
    """

    median: float
    mean: float | None = None
    spread: float | None = None
    count: int | None = None
    flags: list = field(default_factory=list)
    ci: float | None = None

    def to_dict(self) -> dict:
        d = {"median": self.median, "mean": self.mean, "spread": self.spread,
             "count": self.count}
        if self.ci is not None:
            d["ci"] = self.ci
        if self.flags:
            d["flags"] = list(self.flags)
        return d

    @classmethod
    def parse(cls, d, key: str, factor: float = 1.0) -> "Entry":
        """An entry from its JSON form (an object, or a bare median), latencies times
        ``factor`` to milliseconds; a ValueError naming the entry and field if bad."""
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            d = {"median": d}
        if not isinstance(d, dict):
            raise ValueError(f"entry {key!r} must be an object with 'median' (and optionally "
                             f"'mean', 'spread', 'count', 'ci', 'flags'), got {d!r}")
        unknown = set(d) - {"median", "mean", "spread", "count", "ci", "flags"}
        if unknown:
            raise ValueError(f"entry {key!r} has unknown field(s) {sorted(unknown)}")
        med = _number(d.get("median"), f"entry {key!r} field 'median'")
        mean = _number(d.get("mean"), f"entry {key!r} field 'mean'", allow_none=True)
        spread = _number(d.get("spread"), f"entry {key!r} field 'spread'", allow_none=True)
        ci = _number(d.get("ci"), f"entry {key!r} field 'ci'", allow_none=True)
        count = _number(d.get("count"), f"entry {key!r} field 'count'", allow_none=True,
                        integer=True)
        flags = d.get("flags", [])
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise ValueError(f"entry {key!r} field 'flags' must be a list of strings")
        return cls(med * factor, None if mean is None else mean * factor, spread, count,
                   list(flags), ci)


def _signed_ms(value, what: str) -> None:
    """A correction in ms: a finite number, negative allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number (ms, may be negative), "
                         f"got {value!r}")


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


# --- files ----------------------------------------------------------------------------

def load(path: str | os.PathLike) -> dict:
    """Read our JSON (``*.json``, or any file starting with ``{``) or a plain CSV table."""
    path = os.fspath(path)
    try:
        with open(path, newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"latency table {path!r} does not exist") from None
    is_json = path.endswith(".json") or text.lstrip().startswith("{")
    if is_json:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"latency table {path!r} is not valid JSON: {e}") from None
    try:
        return from_dict(d) if is_json else from_csv(text)
    except ValueError as e:
        raise ValueError(f"latency table {path!r}: {e}") from None


def save(table, path: str | os.PathLike) -> None:
    """Write JSON, or the plain CSV format when ``path`` ends in ``.csv``."""
    path = os.fspath(path)
    with open(path, "w", newline="") as f:
        if path.endswith(".csv"):
            f.write(to_csv(table))
        else:
            json.dump(to_dict(table), f, indent=1)
            f.write("\n")


# --- our JSON ---------------------------------------------------------------------------

def to_dict(table) -> dict:
    return {"schema": SCHEMA, "unit": "ms", **table.meta, "space": table.space_dict,
            "num_classes": table.num_classes, "calibration": table.calibration,
            "warnings": table.warnings,
            "entries": {k: e.to_dict() for k, e in table.entries.items()}}


def from_dict(d: dict) -> dict:
    """The table's keyword arguments from our JSON object, every field checked."""
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
        parsed[k] = Entry.parse(e, k, UNITS[unit])
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
        types = cal.get("type_scales") or {}
        if not isinstance(types, dict):
            raise ValueError("field 'calibration.type_scales' must be an object "
                             "{candidate: scale}")
        for name, v in types.items():
            _number(v, f"field 'calibration.type_scales.{name}'")
        _signed_ms(cal.get("offset_ms", 0.0), "field 'calibration.offset_ms'")
        corrections = cal.get("entry_ms") or {}
        if not isinstance(corrections, dict):
            raise ValueError("field 'calibration.entry_ms' must be an object {op key: ms}")
        for k, v in corrections.items():
            check_key(k)
            _signed_ms(v, f"field 'calibration.entry_ms.{k}'")
    nc = d.get("num_classes")
    meta = {k: v for k, v in d.items() if k not in
            {"schema", "unit", "entries", "space", "num_classes", "calibration", "warnings"}}
    return {"entries": parsed, "meta": meta, "space": space,
            "num_classes": None if nc is None else int(nc), "calibration": cal,
            "warnings": d.get("warnings") or []}


# --- the plain CSV ----------------------------------------------------------------------

def from_csv(text: str) -> dict:
    """The table's keyword arguments from the plain CSV format: ``op,latency_<unit>`` rows."""
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
            entries[key] = Entry.parse(
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
    return {"entries": entries, "meta": meta, "space": space,
            "num_classes": None if nc is None else int(nc)}


def to_csv(table, unit: str = "ms") -> str:
    """The plain CSV form of ``table`` (calibration already applied to the latencies)."""
    out = io.StringIO()
    for k in ("device", "runtime", "dtype", "batch", "threads"):
        if k in table.meta:
            v = table.meta[k]
            out.write(f"# {k}: {v['name'] if isinstance(v, dict) else v}\n")
    if table.space_dict is not None:
        out.write(f"# space: {json.dumps(table.space_dict)}\n")
    if table.num_classes is not None:
        out.write(f"# num_classes: {table.num_classes}\n")
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["op", f"latency_{unit}", "spread", "count"])
    for k, e in table.entries.items():
        w.writerow([k, repr(table.value(k) / UNITS[unit]),
                    "" if e.spread is None else repr(e.spread),
                    "" if e.count is None else e.count])
    return out.getvalue()
