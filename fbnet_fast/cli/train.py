"""``fbnet-fast train ARCH``: train one architecture from scratch, report val top-1."""
from __future__ import annotations

import dataclasses

from ..search.faults import RunStopped
from ..search.rundir import RunDir
from ..search.train import TrainConfig, train
from . import one_line_errors
from .search import EXIT_CODES, add_config_flags, add_run_flags


def register(sub) -> None:
    p = sub.add_parser("train", help="train an architecture from scratch (default data: "
                                     "the built-in set)", epilog=EXIT_CODES)
    p.add_argument("arch", help="zoo name, architecture JSON (e.g. RUN_DIR/archs/argmax.json) "
                                "or short string")
    add_config_flags(p, [f for f in dataclasses.fields(TrainConfig) if f.name != "arch"],
                     lambda f: f" (default: {f.default})")
    add_run_flags(p)
    one_line_errors(p, "train")
    p.set_defaults(func=run)


def run(args) -> int:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
          if getattr(args, f.name, None) is not None}
    out = RunDir(kw.get("out", TrainConfig.out), "training run")
    if args.resume is True or (args.resume == "auto" and out.has_checkpoint()):
        # the saved settings win; ARCH is always given, so only flags count
        out.saved_config(kw, free=("arch",))
    try:
        train(TrainConfig(**kw), resume=args.resume, quiet=args.quiet)
    except RunStopped as e:
        return e.report("train")
    return 0
