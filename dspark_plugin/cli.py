"""`dspark` console script: one subcommand per module in dspark_plugin.commands.

Each command module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`.
Modules import their heavy dependencies inside `run`, so `dspark --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from dspark_plugin import commands
from dspark_plugin.errors import DSparkError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dspark", description="DSpark speculative decoding tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"dspark_plugin.commands.{info.name}")
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except DSparkError as e:
        # Bad input is the user's to fix: one line, no traceback.
        print(f"dspark {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
