"""``fbnet-fast train ARCH``: train one architecture from scratch, report val top-1."""
from __future__ import annotations

import dataclasses

from ..search.config import flag_name
from ..search.rundir import RunDir
from ..search.train import TrainConfig, train
from . import one_line_errors


def register(sub) -> None:
    p = sub.add_parser("train", help="train an architecture from scratch (default data: "
                                     "the built-in set)")
    p.add_argument("arch", help="zoo name, architecture JSON (e.g. RUN_DIR/archs/argmax.json) "
                                "or short string")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "arch":
            continue
        p.add_argument(f"--{flag_name(f.name)}", dest=f.name, default=None,
                       type=f.metadata["type"], help=f"{f.metadata['help']} (default: "
                                                      f"{f.default})")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR's checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    one_line_errors(p, "train")
    p.set_defaults(func=run)


def run(args) -> int:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
          if getattr(args, f.name, None) is not None}
    if args.resume:   # the saved settings win; ARCH is always given, so only flags count
        RunDir(kw.get("out", TrainConfig.out), "training run").saved_config(kw, free=("arch",))
    train(TrainConfig(**kw), resume=args.resume, quiet=args.quiet)
    return 0
