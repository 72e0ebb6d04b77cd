"""``fbnet-fast`` / ``python -m fbnet_fast``: one subcommand per module of this package.

Each ``fbnet_fast/cli/<name>.py`` defines ``register(subparsers)``, which adds its
parser and sets ``func`` (called with the parsed arguments, returning an exit code).
A ``ValueError`` or ``FileNotFoundError`` raised by a command is a user error: it is
printed as one line, not as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fbnet-fast", description="FBNet architecture search with fused kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def one_line_errors(parser, command: str) -> None:
    """argparse errors as one line and exit code 2, like the commands' own errors."""
    def error(message):
        print(f"fbnet-fast {command}: error: {message}", file=sys.stderr)
        sys.exit(2)
    parser.error = error


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"fbnet-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
