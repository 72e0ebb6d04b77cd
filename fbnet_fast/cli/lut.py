"""``fbnet-fast lut``: measure, validate, import, show and template latency tables."""
from __future__ import annotations

import json
import sys

from ..latency.keys import head_key, layer_keys, required_keys, stem_key
from ..latency.measuring import METHODS, measure
from ..latency.runtimes import RUNTIMES
from ..latency.table import LatencyTable
from ..latency.validation import validate_many
from ..nn.space import SearchSpace


def _space_args(p) -> None:
    g = p.add_argument_group("search space")
    g.add_argument("--resolution", type=int, default=None, help="input size (default 224)")
    g.add_argument("--width", type=float, default=None, help="width multiplier (default 1.0)")
    g.add_argument("--head", type=int, default=None, help="head channels (default 1984)")
    g.add_argument("--small", action="store_true", help="the 32x32 variant (stem stride 1)")
    g.add_argument("--num-classes", type=int, default=None, help="classifier size (default 1000)")


def _space(args, fallback=None):
    given = {k: v for k, v in (("resolution", args.resolution), ("width", args.width),
                               ("head_channels", args.head)) if v is not None}
    if not given and not args.small:
        return fallback
    if args.small:
        return SearchSpace.small(**given)
    return SearchSpace(**given)


def register(sub) -> None:
    p = sub.add_parser("lut", help="latency lookup tables: measure, validate, import, show")
    lsub = p.add_subparsers(dest="lut_command", metavar="ACTION", required=True)

    m = lsub.add_parser("measure", help="measure a table for a search space on this machine")
    m.add_argument("--out", required=True, help="output file (.json, or .csv)")
    m.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    m.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads while measuring (default: torch's current)")
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--method", default=None, choices=METHODS,
                   help="naive: ops timed alone; context: ops timed inside random whole "
                        "networks (torch only); calibrated (torch's default): context "
                        "(onnxruntime: naive) + a whole-network scale; fitted: the same "
                        "entries + a per-network cost and per-type scales fitted by least "
                        "squares; regressed (onnxruntime's default): the same entries + a "
                        "per-network cost and per-entry corrections, ridge regression on "
                        "200 whole networks")
    m.add_argument("--runtime", default="torch", choices=RUNTIMES,
                   help="torch (eager, default) or onnxruntime (each op exported with "
                        "torch.onnx; needs pip install \"fbnet_fast[onnx]\")")
    m.add_argument("--reps", type=int, default=None,
                   help="timed runs per op (naive, default 100) or rounds (default 20)")
    m.add_argument("--warmup", type=int, default=None)
    m.add_argument("--ci", type=float, default=None,
                   help="re-measure until each entry's median is known within this fraction "
                        "(95%% confidence, e.g. 0.02); replaces the spread rule")
    m.add_argument("--max-rounds", type=int, default=10,
                   help="with --ci: at most this many re-measurements (default 10)")
    m.add_argument("--calib-samples", type=int, default=None,
                   help="whole networks measured for the fit (default 24 calibrated and "
                        "fitted, 200 regressed)")
    m.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"])
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-progress", action="store_true")
    _space_args(m)
    m.set_defaults(func=run_measure)

    v = lsub.add_parser("validate", help="compare a table's predictions with whole networks",
                        description="Several tables (measured with the same settings) are "
                                    "scored against one measurement of the same networks.")
    v.add_argument("table", nargs="+")
    v.add_argument("--samples", type=int, default=20, help="random architectures (default 20)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--reps", type=int, default=20,
                   help="timed runs in a row per network and round (default 20)")
    v.add_argument("--warmup", type=int, default=10,
                   help="untimed runs before them (default 10)")
    v.add_argument("--rounds", type=int, default=2,
                   help="rounds; each times every network once (default 2)")
    v.add_argument("--runtime", default=None, choices=RUNTIMES,
                   help="time the networks in this runtime (default: the tables')")
    v.add_argument("--arch", action="append", default=[],
                   help="also time this architecture (zoo name, file or string); repeatable")
    v.add_argument("--json", default=None, help="write {mape, spearman, rows} here")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=run_validate)

    i = lsub.add_parser("import", help="convert a CSV table (docs/latency.md) to our JSON")
    i.add_argument("csv")
    i.add_argument("--out", required=True)
    _space_args(i)
    i.set_defaults(func=run_import)

    s = lsub.add_parser("show", help="print a table per layer, noisy entries marked")
    s.add_argument("table")
    _space_args(s)
    s.set_defaults(func=run_show)

    t = lsub.add_parser("template", help="write a CSV listing every op a space needs, to fill "
                                         "in with latencies measured elsewhere")
    t.add_argument("--out", required=True)
    t.add_argument("--unit", default="ms", choices=["ms", "us", "s"])
    _space_args(t)
    t.set_defaults(func=run_template)


def run_measure(args) -> int:
    space = _space(args, SearchSpace())
    table = measure(
        space, device=args.device, batch=args.batch, threads=args.threads, method=args.method,
        reps=args.reps, warmup=args.warmup, num_classes=args.num_classes or 1000,
        memory_format=args.memory_format, calib_samples=args.calib_samples, seed=args.seed,
        progress=not args.no_progress, runtime=args.runtime, ci=args.ci,
        max_rounds=args.max_rounds)
    table.save(args.out)
    print(f"wrote {args.out}: {table!r}")
    for w in table.warnings:
        print(f"  warning: {w}")
    cal = table.calibration
    if cal and "type_scales" in cal:
        print(f"  fitted on {len(cal['networks'])} whole networks: offset "
              f"{cal['offset_ms']:+.3f} ms, scales " + ", ".join(
                  f"{k} {v:.2f}" for k, v in cal["type_scales"].items()))
    elif cal:
        print(f"  calibration scale {cal['scale']:.3f} ({len(cal['networks'])} whole networks)")
    print(f"  measured in {table.meta['seconds']} s")
    return 0


def run_validate(args) -> int:
    tables = [LatencyTable.load(p) for p in args.table]
    reports = validate_many(tables, samples=args.samples, seed=args.seed, reps=args.reps,
                            warmup=args.warmup, rounds=args.rounds, runtime=args.runtime,
                            archs=args.arch, progress=not args.no_progress)
    r0 = reports[0]
    print(f"{len(args.arch)} named and {r0['samples']} random architectures (seed "
          f"{r0['seed']}) in {r0['runtime']}, device {r0['device']}, batch {r0['batch']}, "
          f"threads {r0['threads']}; each: {r0['warmup']} warm-up then {r0['reps']} runs in a "
          f"row, {r0['rounds']} rounds, median")
    head = "".join(f"{'pred ' + str(i + 1):>10}" for i in range(len(tables)))
    print(f"{'#':>3} {'measured ms':>12} {'spread':>7}{head}")
    for n, row in enumerate(r0["rows"]):
        preds = "".join(f"{r['rows'][n]['predicted_ms']:>10.2f}" for r in reports)
        name = row["name"] or n + 1
        print(f"{name:>3} {row['measured_ms']:>12.2f} {row['spread']:>7.1%}{preds}")
    for i, (path, r) in enumerate(zip(args.table, reports)):
        print(f"pred {i + 1}: {path} (method {r['method']}): MAPE {r['mape']:.1f} %, "
              f"Spearman {r['spearman']:.3f}, mean signed error {r['bias_pct']:+.1f} %")
    again = r0["repeatability"]
    if again:
        print(f"the networks against themselves (later rounds against the first, what no table "
              f"can beat): MAPE {again['mape']:.1f} %, Spearman {again['spearman']:.3f}")
    if args.json:
        data = reports[0] if len(reports) == 1 else {
            "tables": [dict(r, table=p) for p, r in zip(args.table, reports)]}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    return 0


def run_import(args) -> int:
    table = LatencyTable.load(args.csv)
    space = _space(args)
    if space is not None:
        table.space_dict = space.to_dict()
    if args.num_classes is not None:
        table.num_classes = args.num_classes
    if table.space_dict is not None:
        table.check()
    table.save(args.out)
    print(f"wrote {args.out}: {table!r}")
    if table.space_dict is None:
        print("  note: no search space recorded (give --resolution/--width/... to check "
              "coverage now; otherwise it is checked when the table is used)", file=sys.stderr)
    return 0


def run_show(args) -> int:
    table = LatencyTable.load(args.table)
    space = _space(args, table.space)
    if space is None:
        raise ValueError("this table records no search space: give --resolution/--width/...")
    nc = args.num_classes or table.num_classes or 1000
    meta = table.meta
    dev = meta.get("device")
    print(f"{args.table}: {dev.get('name') if isinstance(dev, dict) else dev}, "
          f"{meta.get('runtime')}, {meta.get('dtype')}, batch {meta.get('batch')}, threads "
          f"{meta.get('threads')}, method {meta.get('method')}, unit ms"
          + (f", calibration scale {table.calibration['scale']:.3f}" if table.calibration else "")
          + (f", offset {table.calibration['offset_ms']:+.3f} ms"
             if table.calibration and "offset_ms" in table.calibration else ""))
    cands = space.candidates
    print(f"{'layer':<6} {'shape':<17}" + "".join(f"{c:>10}" for c in cands))
    for l, row in zip(space.layers(), layer_keys(space)):
        shape = f"{l.in_channels}>{l.out_channels} s{l.stride} {l.in_size}"
        cells = []
        for k in row:
            if k not in table.entries:
                cells.append(f"{'missing':>10}")
                continue
            e = table.entries[k]
            mark = ("!" if any(f.startswith("order") for f in e.flags) else "") + \
                   ("~" if any(f.startswith("noisy") for f in e.flags) else "")
            cells.append(f"{table.value(k):>{10 - len(mark)}.3f}{mark}")
        print(f"{'tbs' + str(l.index + 1):<6} {shape:<17}" + "".join(cells))
    for name, k in (("stem", stem_key(space)), ("head", head_key(space, nc))):
        v = f"{table.value(k):.3f} ms" if k in table.entries else "missing"
        print(f"{name:<6} {k:<30} {v}")
    print("marks: ~ noisy (spread above the limit), ! breaks an expected ordering")
    for w in table.warnings:
        print(f"warning: {w}")
    return 0


def run_template(args) -> int:
    space = _space(args, SearchSpace())
    nc = args.num_classes or 1000
    with open(args.out, "w") as f:
        f.write("# fbnet_fast latency table: fill in one latency per op (docs/latency.md)\n")
        f.write(f"# space: {json.dumps(space.to_dict())}\n# num_classes: {nc}\n")
        f.write(f"op,latency_{args.unit}\n")
        for k in required_keys(space, nc):
            f.write(f"{k},\n")
    print(f"wrote {args.out}: {len(required_keys(space, nc))} ops to measure")
    return 0
