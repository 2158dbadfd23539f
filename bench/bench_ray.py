"""How the Ray parts scale on this machine, each compared side by side in one run:

- `bd3 rl --engine vllm` with one engine in the trainer's process against `--rollout-workers 2` (two engines
  as Ray actors): seconds per iteration for rollouts, scoring and the weight update (the broadcast), and the
  bytes each update sends;
- (with `--shards`) one task scored by `bd3-sweep` in 1, 2 and 4 shards.

    python bench/bench_ray.py [--iterations 6] [--prompts 4] [--shards 1,2,4] [--limit 200] [--no-rl]

Start-up (Ray, the engines) is left out of the per-iteration figures and printed apart.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RL = ["--engine", "vllm", "--steps-per-rollout", "4", "--eval-every", "0", "--final-samples", "64", "--json"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _rl(out: Path, args, workers: int | None) -> dict:
    argv = [str(BIN / "bd3"), "rl", *RL, "--iterations", str(args.iterations), "--prompts", str(args.prompts),
            "--out", str(out)]
    if workers:
        argv += ["--rollout-workers", str(workers)]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_ray.py: {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["command_seconds"] = time.perf_counter() - start
    return summary


def rl_pool(args, tmp: Path) -> None:
    from bd3_plugin.core.checkpoint import load_checkpoint
    from bd3_plugin.tinyworld.data import checkpoint_path

    state = load_checkpoint(checkpoint_path(16)).model.state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values())
    runs = {"one engine in the trainer": _rl(tmp / "one", args, None),
            "2 engines on Ray (--rollout-workers 2)": _rl(tmp / "two", args, 2)}
    print(f"\n## bd3 rl --engine vllm, tiny-bd3-L16, {args.iterations} iterations x {args.prompts} prompts x 4 "
          f"rollouts; an update sends {size / 1e6:.2f} MB (float32 state dict) to each engine")
    print(f"{'':42s} {'rollouts':>9s} {'scoring':>9s} {'update':>9s} {'iteration':>10s} {'start-up etc.':>14s}")
    per = {}
    for name, s in runs.items():
        n = s["iterations"]
        sec = s["seconds"]
        per[name] = sec["total"] / n
        print(f"{name:42s} {sec['rollouts'] / n:8.2f}s {sec['scoring'] / n:8.2f}s {sec['weight_update'] / n:8.3f}s "
              f"{sec['total'] / n:9.2f}s {s['command_seconds'] - sec['total']:13.1f}s")
    one, two = per.values()
    print(f"ratio (one engine / pool of 2), seconds per iteration: {one / two:.2f}x")


def sharded_sweep(args, tmp: Path) -> None:
    import ray

    from bd3_plugin.tinyworld.data import checkpoint_path
    from ray_jobs.launcher import run_sweep
    from ray_jobs.plan import plan

    print(f"\n## bd3-sweep of synthetic_ppl on tiny-bd3-L16, {args.limit} documents, a local instance of "
          f"{os.cpu_count()} CPUs (start-up included)")
    seconds = {}
    for shards in args.shards:
        units = plan([str(checkpoint_path(16))], [["synthetic_ppl"]], limit=args.limit, shards=shards)
        start = time.perf_counter()
        counts = run_sweep(units, tmp / f"shards{shards}", num_cpus=os.cpu_count(), progress=False)
        seconds[shards] = time.perf_counter() - start
        if counts["failed"]:
            sys.exit(f"bench_ray.py: the sweep in {shards} shards had failed units")
        ray.shutdown()  # the next count starts its own instance, as a new sweep would
        print(f"{shards} shard(s): {seconds[shards]:6.1f} s   speed-up over {args.shards[0]}: "
              f"{seconds[args.shards[0]] / seconds[shards]:4.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench_ray.py")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--shards", type=_ints, default=None, help="shard counts for the sharded sweep, e.g. 1,2,4")
    ap.add_argument("--limit", type=int, default=200, help="documents of the sharded task")
    ap.add_argument("--no-rl", action="store_true", help="leave out the RL pool")
    args = ap.parse_args()
    if args.iterations < 1 or args.prompts < 1 or args.limit < 1:
        sys.exit("bench_ray.py: --iterations, --prompts and --limit must be at least 1")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            sharded_sweep(args, Path(tmp))
        if not args.no_rl:
            rl_pool(args, Path(tmp))


if __name__ == "__main__":
    main()
