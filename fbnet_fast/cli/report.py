"""``fbnet-fast report RUN_DIR``: (re)draw a search run's plots."""
from __future__ import annotations

import json
import os

from ..search.plots import make_plots
from ..search.rundir import RunDir
from ..search.summary import format_archs
from . import one_line_errors


def register(sub) -> None:
    p = sub.add_parser("report", help="draw a search run's plots (PNG) into RUN_DIR/plots")
    p.add_argument("run_dir", help="a directory written by fbnet-fast search")
    one_line_errors(p, "report")
    p.set_defaults(func=run)


def run(args) -> int:
    paths = make_plots(args.run_dir)
    summary = RunDir(args.run_dir).summary
    if os.path.exists(summary):
        with open(summary) as f:
            print(format_archs(json.load(f)))
    for p in paths:
        print(p)
    return 0
