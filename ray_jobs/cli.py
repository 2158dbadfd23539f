"""`bd3-sweep`: evaluate checkpoints × task groups on a Ray cluster (default: a local instance).

    bd3-sweep --checkpoints 'bd3_plugin/checkpoints/*' --tasks synthetic_ppl synthetic_mc --out runs/sweep

Each `--tasks` value is one task group (comma-separated tasks run together in one unit); `--shards N` splits
each unit's documents into N units whose per-document results are merged into the task's metrics. Results go
to OUT/units/<unit>/result.json; a rerun skips finished units (and shards) and redoes failed ones; the merged
table is OUT/results.csv and OUT/results.md, the plot OUT/plot.png.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from ray_jobs.inputs import InputError, check_inputs
from ray_jobs.plan import expand_checkpoints, plan, status


def task_groups(values: list[str]) -> list[list[str]]:
    """Task, group or tag names, comma lists of them, or task folders (e.g. lm_eval_tasks/bd3_zeroshot)."""
    groups = []
    for value in values:
        group = []
        for item in filter(None, value.split(",")):
            folder = Path(item)
            group += sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else [item]
        groups.append(group)
    return groups


def shards_arg(value: str) -> int | str:
    """A positive number of shards, or auto (one per worker of the cluster)."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    from bd3_plugin.tinyworld.data import bundled_checkpoints

    from bd3_plugin.cli.common import DefaultsFormatter

    # Abbreviations refused: a prefix of one option is never taken for another.
    p = argparse.ArgumentParser(prog="bd3-sweep", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=DefaultsFormatter)
    # The default tasks are the grammar's, so the default checkpoints are those trained on it (the copy
    # task's checkpoints have their own task, copy_gen).
    p.add_argument("--checkpoints", nargs="+", default=[str(c) for c in bundled_checkpoints()],
                   help="checkpoint folders, globs or hub ids (default: the bundled grammar checkpoints, "
                        "L' = 1, 4, 16, 128)")
    p.add_argument("--tasks", nargs="+", default=["synthetic_ppl", "synthetic_mc"], help="task groups (lm_eval_tasks/)")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="folder of the results, table and plot")
    p.add_argument("--address", default=None, help="an existing Ray cluster: HOST:PORT, or auto (RAY_ADDRESS, else the cluster "
                        "of the latest `ray start` on this machine) (default: start a new local instance)")
    p.add_argument("--gpus-per-unit", type=float, default=None, help="default: 1 if the cluster has GPUs, else 0")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--model-args", default="",
                   help="extra --model_args for `bd3`, e.g. passes=32 or estimator=mc,passes=4 (default: the "
                        "adapter's estimator, auto with 16 passes)")
    p.add_argument("--limit", type=int, default=None, help="documents per task, for quick runs (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size of a unit")
    p.add_argument("--shards", type=shards_arg, default=1,
                   help="split each (checkpoint, task group) by document into this many units, merged exactly; "
                        "auto: one per GPU of the cluster, else one per CPU")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a unit whose worker died")
    p.add_argument("--json", action="store_true", help="print the merged table as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ray_jobs.collect import markdown, plot, rows, write_table
    from ray_jobs.cluster import ClusterError, disconnect
    from ray_jobs.launcher import auto_shards, run_sweep

    groups = task_groups(args.tasks)
    try:  # before any cluster starts or is joined
        check_inputs(expand_checkpoints(args.checkpoints), groups, args.model_args, args.batch_size)
    except InputError as err:
        print(f"bd3-sweep: error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        # Ray prints its reports to the driver (a worker or a node lost, a task retried) on stdout, which is the
        # table's: they go to stderr, and stop with Ray before the table is printed.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                shards = (auto_shards(args.address, args.num_cpus, args.gpus_per_unit) if args.shards == "auto"
                          else args.shards)
                units = plan(args.checkpoints, groups, model_args=args.model_args, limit=args.limit,
                             batch_size=args.batch_size, shards=shards)
                counts = run_sweep(units, args.out, address=args.address, gpus_per_unit=args.gpus_per_unit,
                                   num_cpus=args.num_cpus, max_retries=args.max_retries)
            finally:
                disconnect()
    except ClusterError as err:
        print(f"bd3-sweep: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bd3-sweep: interrupted; finished units are kept, the same command runs the rest", file=sys.stderr)
        return 130
    table = rows(units, args.out)
    csv_path, md_path = write_table(table, args.out)
    png = plot(table, args.out)
    print(json.dumps(table, indent=2) if args.json else markdown(table))
    failed = [u.key for u in units if status(u, args.out) != "done"]
    merged = "" if shards == 1 else f" ({len(units) // shards} × {shards} shards)"
    print(f"\n{len(units)} units{merged} ({counts['ran']} run now, {len(failed)} failed); table: {csv_path}, {md_path}"
          + (f"; plot: {png}" if png else ""), file=sys.stderr)
    return 1 if failed or any(r["status"] != "ok" for r in table) else 0


if __name__ == "__main__":
    sys.exit(main())
