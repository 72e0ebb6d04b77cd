"""``fbnet-fast search``: run or resume a DNAS search (flags = ``SearchConfig`` fields)."""
from __future__ import annotations

import dataclasses

from ..search.config import SearchConfig, flag_name, make_config
from ..search.loop import run_search
from ..search.rundir import RunDir
from . import one_line_errors


def register(sub) -> None:
    p = sub.add_parser("search", help="run the FBNet search (default: the quick built-in job)",
                       description="Run the FBNet DNAS search. --preset quick (default without "
                                   "--data) runs on the built-in data set on a CPU; --preset "
                                   "paper (default with --data) uses the paper's schedule.")
    for f in dataclasses.fields(SearchConfig):
        md = f.metadata
        kw = {"dest": f.name, "default": None, "type": md["type"],
              "help": md["help"] + ("" if f.name in ("out", "preset") else
                                    f" (paper: {f.default})")}
        if md.get("choices"):
            kw["metavar"] = "|".join(md["choices"])
        p.add_argument(f"--{flag_name(f.name)}", **kw)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    one_line_errors(p, "search")
    p.set_defaults(func=run)


def run(args) -> int:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(SearchConfig)}
    if not values["out"]:
        raise ValueError("--out RUN_DIR is required")
    if args.resume:   # the saved settings win; --preset only fills in defaults
        cfg = SearchConfig(**RunDir(values["out"]).saved_config(values, free=("preset",)))
    else:
        cfg = make_config(values.pop("preset"), **values)
    run_search(cfg, resume=args.resume, quiet=args.quiet)
    return 0
