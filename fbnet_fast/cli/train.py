"""``fbnet-fast train ARCH``: train one architecture from scratch, report val top-1."""
from __future__ import annotations

import dataclasses
import json
import os

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
        p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                       type=f.metadata["type"], help=f"{f.metadata['help']} (default: "
                                                      f"{f.default})")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR's checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    one_line_errors(p, "train")
    p.set_defaults(func=run)


def run(args) -> int:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
          if getattr(args, f.name, None) is not None}
    if args.resume:
        path = os.path.join(kw.get("out", TrainConfig.out), "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: {path!r} does not exist; nothing to resume")
        with open(path) as f:
            saved = json.load(f)
        for k, v in kw.items():
            if k not in ("out", "arch") and saved.get(k) != v:
                raise ValueError(f"--resume continues the saved config: --{k.replace('_', '-')}"
                                 f" {v!r} differs from the run's {saved.get(k)!r}; drop it")
    train(TrainConfig(**kw), resume=args.resume, quiet=args.quiet)
    return 0
