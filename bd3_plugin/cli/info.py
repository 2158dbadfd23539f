"""`bd3 info`: a checkpoint's configuration and files."""
from __future__ import annotations

from bd3_plugin.cli.common import add_checkpoint, checkpoint_arg, subparser


def add_parser(sub) -> None:
    p = subparser(sub, "info", help="show a checkpoint's configuration")
    add_checkpoint(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> dict:
    from bd3_plugin.core.checkpoint import read_config, checkpoint_folder

    folder = checkpoint_folder(checkpoint_arg(args))
    cfg = read_config(folder)
    files = sorted(p.name for p in folder.iterdir())
    info = {"path": str(folder), **cfg.to_dict(), "mask_id": cfg.mask_id, "head_dim": cfg.head_dim, "files": files}
    if not args.json:
        for k, v in info.items():
            print(f"{k:18s} {v}")
    return info
