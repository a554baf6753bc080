"""The `qdlm` command. Each subcommand is a module in `qdlm_jax/commands/` defining
NAME, HELP, `add_arguments(parser)` and `run(args, overrides) -> int`.

`--config.KEY=VALUE` overrides are split off before argparse and handed to the subcommand.
Errors users can fix (bad path, bad key, bad value) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from qdlm_jax import commands
from qdlm_jax.errors import UserError
from qdlm_jax.jobs.config_flags import split_config_args


def _subcommands():
    mods = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            mods.append(importlib.import_module(f"qdlm_jax.commands.{info.name}"))
    return mods


def build_parser():
    parser = argparse.ArgumentParser(prog="qdlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for mod in _subcommands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        runners[mod.NAME] = mod.run
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = split_config_args(argv)
    parser, runners = build_parser()
    args = parser.parse_args(rest)
    try:
        return int(runners[args.command](args, overrides) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:  # bad input users can fix: one line, exit 2
        print(f"qdlm {args.command}: error: {str(e).splitlines()[0] if str(e) else e!r}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
