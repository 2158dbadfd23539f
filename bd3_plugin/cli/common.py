"""What every `bd3` command shares: the user's-mistake exception, the checkpoint arguments and loading."""
from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager


class UsageError(ValueError):
    """A mistake in the command line or its inputs: one line on stderr and exit status 2."""


@contextmanager
def user_input() -> Iterator[None]:
    """Around code that validates the user's settings (config dataclasses raise ValueError on a bad field):
    their ValueError is the user's mistake. Outside such a block a ValueError is a bug and shows a traceback."""
    try:
        yield
    except ValueError as err:
        raise UsageError(str(err)) from None


def add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint folder or Hugging Face hub id (default: the bundled tiny-bd3-L4)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights' dtype (default: float32)")


def checkpoint_arg(args) -> str:
    """The checkpoint named on the command line, or the bundled default."""
    if args.checkpoint is not None:
        return args.checkpoint
    from bd3_plugin.tinyworld.data import checkpoint_path

    return str(checkpoint_path())


def load(args):
    import torch

    from bd3_plugin.core.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint_arg(args), device=args.device, dtype=getattr(torch, args.dtype))


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or unset or action.required:
            return text
        if not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def subparser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser: abbreviated options are refused (`--samples` is never `--samples-out`), and
    --help states every default."""
    return sub.add_parser(name, allow_abbrev=False, formatter_class=DefaultsFormatter, **kwargs)
