"""How the Ray parts scale on this machine, each compared side by side in one run:

- `bd3 rl --engine vllm` with one engine in the trainer's process against `--rollout-workers 2` (two engines
  as Ray actors): seconds per iteration for rollouts, scoring and the weight update (the broadcast), and the
  bytes each update sends;
- (with `--shards`) one task scored by `bd3-sweep` in 1, 2 and 4 shards;
- (with `--serve`) one `bd3 serve` against `bd3 serve --ray-replicas 2` (Ray Serve), the same requests at
  concurrency 16: output tokens per second. The two servers run one after the other, never beside each other.

    python bench/bench_ray.py [--iterations 6] [--prompts 4] [--shards 1,2,4] [--limit 200] [--serve] [--no-rl]

Start-up (Ray, the engines) is left out of the per-iteration figures and printed apart.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
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


def _load(base: str, model: str, requests_: int, concurrency: int, max_tokens: int) -> tuple[float, int]:
    """`requests_` completions at `concurrency`, each exactly `max_tokens` tokens: (seconds, output tokens)."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    def one(i: int) -> int:
        body = {"model": model, "prompt": f"<eos> the cow {i}", "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 1.0, "seed": i}
        r = requests.post(f"{base}/v1/completions", json=body, timeout=600)
        if r.status_code != 200:
            sys.exit(f"bench_ray.py: {base} answered {r.status_code}: {r.text[:300]}")
        return r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        produced = sum(pool.map(one, range(requests_)))
    return time.perf_counter() - start, produced


def serving(args, tmp: Path) -> None:
    import requests

    from bd3_plugin.tinyworld.data import checkpoint_path

    model = str(checkpoint_path(16))
    print(f"\n## bd3 serve vs bd3 serve --ray-replicas 2 (Ray Serve), tiny-bd3-L16: {args.requests} requests of "
          f"{args.max_tokens} tokens at concurrency {args.concurrency} (start-up left out; a warm-up of 16 first)")
    rates = {}
    for name, extra in (("bd3 serve (one engine)", []), ("--ray-replicas 2", ["--ray-replicas", "2"])):
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        log = (tmp / f"serve{len(rates)}.log").open("w")
        proc = subprocess.Popen([str(BIN / "bd3"), "serve", model, "--port", str(port), *extra], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 900
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    sys.exit(f"bench_ray.py: {name} did not start:\n{Path(log.name).read_text()[-2000:]}")
                try:
                    if requests.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except (requests.ConnectionError, requests.Timeout):
                    pass
                time.sleep(1)
            _load(base, model, 16, args.concurrency, args.max_tokens)
            seconds, produced = _load(base, model, args.requests, args.concurrency, args.max_tokens)
        finally:
            os.killpg(proc.pid, 2)  # Ctrl-C: each server takes its own processes (and Ray instance) down
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        rates[name] = produced / seconds
        print(f"{name:26s} {seconds:7.1f} s  {rates[name]:7.1f} output tok/s")
    one, two = rates.values()
    print(f"ratio (replicas / one engine), output tokens per second: {two / one:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench_ray.py")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--shards", type=_ints, default=None, help="shard counts for the sharded sweep, e.g. 1,2,4")
    ap.add_argument("--limit", type=int, default=200, help="documents of the sharded task")
    ap.add_argument("--serve", action="store_true", help="one bd3 serve against --ray-replicas 2")
    ap.add_argument("--requests", type=int, default=64, help="requests of the serving comparison")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-rl", action="store_true", help="leave out the RL pool")
    args = ap.parse_args()
    if min(args.iterations, args.prompts, args.limit, args.requests, args.concurrency, args.max_tokens) < 1:
        sys.exit("bench_ray.py: --iterations, --prompts, --limit, --requests, --concurrency and --max-tokens "
                 "must be at least 1")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.shards:
            sharded_sweep(args, Path(tmp))
        if args.serve:
            serving(args, Path(tmp))
        if not args.no_rl:
            rl_pool(args, Path(tmp))


if __name__ == "__main__":
    main()
