"""``fbnet-fast baseline RUN_DIR --random K``: the search's architectures against K random
ones of its space, each trained from scratch with the same budget, data and recipe."""
from __future__ import annotations

from ..search.baseline import run_baseline
from . import one_line_errors


def register(sub) -> None:
    p = sub.add_parser(
        "baseline", help="train a search's architectures and K random ones from scratch, "
                         "and compare them (RUN_DIR/baseline/baseline.json, plots/baseline.png)",
        description="Train the final architectures of a finished search (RUN_DIR/archs/*.json) "
                    "and K architectures drawn uniformly from its space, each from scratch "
                    "with the same budget, data and recipe (all the run's training images, "
                    "SGD with the run's w_lr, cosine), score them on the validation images, "
                    "and count how many random ones the argmax beats on the run's objective "
                    "and how many dominate it. Resumable: architectures already in "
                    "baseline.json with the same settings are not trained again.",
        epilog="exit codes: 0 done, 2 bad input (one line)")
    p.add_argument("run_dir", help="a directory written by fbnet-fast search")
    p.add_argument("--random", type=int, required=True, metavar="K",
                   help="random architectures to train (>= 0)")
    p.add_argument("--epochs", type=int, default=5,
                   help="epochs of the run's training images per architecture (default 5)")
    p.add_argument("--seed", type=int, default=None,
                   help="init seed, data order and draw of the random architectures "
                        "(default: the run's seed)")
    p.add_argument("--fresh", action="store_true",
                   help="start over, ignoring a baseline.json already there")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    one_line_errors(p, "baseline")
    p.set_defaults(func=run)


def run(args) -> int:
    run_baseline(args.run_dir, random=args.random, epochs=args.epochs, seed=args.seed,
                 quiet=args.quiet, fresh=args.fresh)
    return 0
