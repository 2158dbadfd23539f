"""`bd3`: inspect a checkpoint, compute its NELBO on a text, sample from it, train it, serve it, measure its
generative perplexity, and post-train it with RL. One module per command, each with `add_parser` and `run`.

A user's mistake ends in one line on stderr and exit status 2; a bug shows its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from bd3_plugin.cli import genppl, info, nelbo, rl, sample, serve, train, world
from bd3_plugin.cli.common import UsageError

COMMANDS = {"info": info, "nelbo": nelbo, "sample": sample, "train": train, "world": world, "serve": serve,
            "genppl": genppl, "rl": rl}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bd3", description="Block Diffusion language models (BD3-LMs)",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that report a user's mistake (bad flags, files, checkpoints), not a bug."""
    from bd3_plugin.core.checkpoint import CheckpointError
    from bd3_plugin.core.config import ConfigError

    return UsageError, ConfigError, CheckpointError, OSError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = serve.parse_serve(parser, argv) if argv[:1] == ["serve"] else parser.parse_args(argv)
    try:
        out = COMMANDS[args.command].run(args)
    except _user_errors() as err:
        print(f"bd3 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
