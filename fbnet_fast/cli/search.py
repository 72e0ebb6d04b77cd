"""``fbnet-fast search``: run or resume a DNAS search (flags = ``SearchConfig`` fields)."""
from __future__ import annotations

import dataclasses

from ..search.config import FaultSettings, SearchConfig, flag_name, make_config
from ..search.faults import EXIT_PREEMPTED, EXIT_STOPPED, RunStopped
from ..search.loop import run_search
from ..search.rundir import RunDir
from . import one_line_errors

EXIT_CODES = (f"exit codes: 0 done, 2 bad input (one line), {EXIT_STOPPED} stopped by a fault "
              f"(non-finite values, a failed write, a failed process), {EXIT_PREEMPTED} "
              "stopped by SIGTERM/SIGINT after writing a checkpoint (rerun with --resume)")


def add_config_flags(p, fields, note=None) -> None:
    """One flag per config field, the fault settings last; a bool field is a switch.
    ``note(f)``: help suffix."""
    faults = {f.name for f in dataclasses.fields(FaultSettings)}
    for f in sorted(fields, key=lambda f: f.name in faults):
        md = f.metadata
        kw = {"dest": f.name, "default": None, "help": md["help"] + (note(f) if note else "")}
        if md["type"] is bool:
            kw["action"] = "store_const"
            kw["const"] = True
        else:
            kw["type"] = md["type"]
        if md.get("choices"):
            kw["metavar"] = "|".join(md["choices"])
        p.add_argument(f"--{flag_name(f.name)}", **kw)


def add_run_flags(p) -> None:
    """--resume [auto] and --quiet, shared with ``fbnet-fast train``."""
    p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"],
                   help="continue the run in --out from its last checkpoint; "
                   "'--resume auto': continue it if it has one, else start it (requeues, "
                   "torchrun --max-restarts)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub) -> None:
    p = sub.add_parser("search", help="run the FBNet search (default: the quick built-in job)",
                       description="Run the FBNet DNAS search. --preset quick (default without "
                                   "--data) runs on the built-in data set on a CPU; --preset "
                                   "paper (default with --data) uses the paper's schedule.",
                       epilog=EXIT_CODES)
    add_config_flags(p, dataclasses.fields(SearchConfig),
                     lambda f: "" if f.name in ("out", "preset") else f" (paper: {f.default})")
    add_run_flags(p)
    one_line_errors(p, "search")
    p.set_defaults(func=run)


def run(args) -> int:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SearchConfig)}
    if not values["out"]:
        raise ValueError("--out RUN_DIR is required")
    resume = args.resume
    if resume == "auto":
        resume = RunDir(values["out"]).has_checkpoint()
    if resume:   # the saved settings win; --preset only fills in defaults
        cfg = SearchConfig(**RunDir(values["out"]).saved_config(values, free=("preset",)))
    else:
        cfg = make_config(values.pop("preset"), **values)
    try:
        run_search(cfg, resume=args.resume, quiet=args.quiet)
    except RunStopped as e:
        return e.report("search")
    return 0
