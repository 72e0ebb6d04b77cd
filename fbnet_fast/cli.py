"""``fbnet-fast`` / ``python -m fbnet_fast``: one subcommand per module in ``commands/``.

Each ``fbnet_fast/commands/<name>.py`` defines ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed arguments, returning an exit code).
A ``ValueError`` or ``FileNotFoundError`` raised by a command is a user error: it is
printed as one line, not as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fbnet-fast", description="FBNet architecture search with fused kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"fbnet-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
