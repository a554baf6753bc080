"""qdlm: post-training quantization of diffusion LLMs in JAX (`qdlm COMMAND --help`).

Each subcommand is a module in `qdlm_jax/commands/` defining NAME, HELP,
`add_arguments(parser)` and `run(args, overrides) -> int`.

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
from qdlm_jax.jobs.config_flags import describe_config, split_config_args, suggest_config_flag


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
        config = getattr(mod, "DEFAULT_CONFIG", None)
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP,
                           epilog=describe_config(config) if config else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        runners[mod.NAME] = mod.run
    return parser, runners


def _unknown_args_error(parser, command: str, unknown: list[str], rest: list[str]) -> None:
    """argparse's error for unknown arguments, with the `--config.` spelling when one fits."""
    mod = importlib.import_module(f"qdlm_jax.commands.{command}")
    config = getattr(mod, "DEFAULT_CONFIG", None)
    if "--config" in rest:
        config = rest[rest.index("--config") + 1] if rest.index("--config") + 1 < len(rest) \
            else config
    hint = ""
    if config and unknown[0].startswith("--"):
        arg = unknown[0]
        if "=" not in arg and len(unknown) > 1 and not unknown[1].startswith("-"):
            arg = f"{arg}={unknown[1]}"
        hint = suggest_config_flag(arg, config)
    parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = split_config_args(argv)
    parser, runners = build_parser()
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        _unknown_args_error(parser, args.command, unknown, rest)
    try:
        return int(runners[args.command](args, overrides) or 0)
    except (UserError, FileNotFoundError, ValueError) as e:  # user-fixable: one line, exit 2
        message = str(e).splitlines()[0] if str(e) else repr(e)
        print(f"qdlm {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
