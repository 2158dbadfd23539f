"""`bd3 world`: every bundled checkpoint against the tiny world's exact entropy, and sample validity."""
from __future__ import annotations

from bd3_plugin.cli.common import UsageError, subparser


def add_parser(sub) -> None:
    p = subparser(sub, "world", help="the tiny world's table: bounds per block size against the exact entropy, "
                                     "and sample validity")
    p.add_argument("--mc-samples", type=int, default=4, help="Monte Carlo samples of the bound")
    p.add_argument("--samples", type=int, default=64, help="sampled documents per checkpoint and sampler")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws")
    p.add_argument("--threshold", type=float, default=0.9, help="threshold sampler confidence (copy task)")
    p.add_argument("--copy-items", type=int, default=200, help="held-out copy items per checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> dict:
    from bd3_plugin.tinyworld.data import HELDOUT, bundled_checkpoints, read_heldout
    from bd3_plugin.tinyworld.report import (as_dicts, copy_dicts, copy_markdown, copy_rows, heldout_answer_entropy,
        markdown, world_rows)

    if args.mc_samples < 1 or args.samples < 1 or args.copy_items < 1:
        raise UsageError("--mc-samples, --samples and --copy-items must be >= 1")
    if not 0 < args.threshold <= 1:
        raise UsageError(f"--threshold must lie in (0, 1], got {args.threshold}")
    if not bundled_checkpoints():
        raise UsageError("no bundled checkpoints found; run scripts/build_tiny_world.sh")
    rows = world_rows(mc_samples=args.mc_samples, n_samples=args.samples, seed=args.seed, progress=not args.json)
    copy = copy_rows(threshold=args.threshold, mc_samples=args.mc_samples, seed=args.seed, n_items=args.copy_items)
    entropy = heldout_answer_entropy(args.copy_items)
    if not args.json:
        print(markdown(rows, args.mc_samples, args.samples, len(read_heldout(HELDOUT))))
        if copy:
            print()
            print(copy_markdown(copy, args.threshold, args.mc_samples, entropy))
    return {"rows": as_dicts(rows), "copy": {"answer_entropy": entropy, "threshold": args.threshold,
                                             "rows": copy_dicts(copy)}}
