"""What a change did on the GPU: row-by-row ratios between two ``gpu_report.py`` JSON files.

GPU time is scarce, so a run is compared with the stored one (bench/gpu_runs/) rather than
timing old and new code side by side. Rows match on (kind, layer shape or batch, dtype,
provider); "x" is the old median over the new (above 1: faster now), and the eager rows
show how far the machine itself moved between the two runs.

    python bench/gpu_compare.py bench/gpu_runs/h200-2026-11-29/report.json runs/gpu/report.json
"""
from __future__ import annotations

import argparse
import json
import sys


def timed_rows(path: str) -> dict:
    """{(kind, where, dtype, provider): row} of the rows that have a median time."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"gpu_compare: cannot read {path}: {e}")
    rows = report.get("timings") if isinstance(report, dict) else None
    if not isinstance(rows, list):
        raise SystemExit(f"gpu_compare: {path} is not a gpu_report.py JSON (no 'timings' list)")
    return {(r["kind"], str(r.get("shape") or r["batch"]), r["dtype"], r["provider"]): r
            for r in rows if "median_s" in r}


def compare(old: dict, new: dict) -> list:
    """One dict per row in both files: the two medians (ms) and peaks (MiB), and ratios."""
    out = []
    for key in (k for k in old if k in new):
        a, b = old[key], new[key]
        row = dict(zip(("kind", "where", "dtype", "provider"), key),
                   old_ms=a["median_s"] * 1e3, new_ms=b["median_s"] * 1e3,
                   speedup=a["median_s"] / b["median_s"])
        if a.get("peak_bytes") and b.get("peak_bytes"):
            row.update(old_peak_mib=a["peak_bytes"] / 2**20, new_peak_mib=b["peak_bytes"] / 2**20,
                       memory_ratio=b["peak_bytes"] / a["peak_bytes"])
        out.append(row)
    return out


def table(rows: list) -> str:
    lines = [f"{'kind':8} {'shape/batch':20} {'dtype':5} {'provider':20} {'old ms':>9} "
             f"{'new ms':>9} {'x':>6} {'peak MiB old -> new':>22}"]
    for r in rows:
        peak = (f"{r['old_peak_mib']:9.0f} -> {r['new_peak_mib']:9.0f}" if "memory_ratio" in r
                else f"{'-':>22}")
        lines.append(f"{r['kind']:8} {r['where']:20} {r['dtype']:5} {r['provider']:20} "
                     f"{r['old_ms']:9.2f} {r['new_ms']:9.2f} {r['speedup']:6.2f} {peak}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", help="the earlier gpu_report.py JSON")
    p.add_argument("new", help="the new one")
    args = p.parse_args(argv)
    old, new = timed_rows(args.old), timed_rows(args.new)
    rows = compare(old, new)
    if not rows:
        print("gpu_compare: the two reports share no timed row", file=sys.stderr)
        return 1
    print(table(rows))
    only = len(old) + len(new) - 2 * len(rows)
    if only:
        print(f"({only} rows are in one file only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
