"""Where the time of a `bd3 rl` run goes: rollouts, advantages (greedy one-step completions and rewards),
scoring (reference and policy replays with the backward pass), the optimiser and the rollout engine's
weight update, from the run's own per-iteration log (each iteration timed in the same process).

    python bench/bench_rl.py runs/rl-tiny-world
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PARTS = ("rollouts", "advantages", "scoring", "optimiser", "weight_update")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a `bd3 rl --out` folder")
    args = p.parse_args(argv)
    log = args.run / "log.jsonl"
    if not log.is_file():
        print(f"bench_rl: error: no log.jsonl in {args.run}", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    summary = json.loads((args.run / "summary.json").read_text()) if (args.run / "summary.json").is_file() else {}
    cfg = summary.get("config", {})
    wall = {k: sum(r["seconds"][k] for r in rows) for k in PARTS}
    total = sum(r["seconds"]["total"] for r in rows)
    cpu = sum(r["cpu_seconds"] for r in rows)
    print(f"# {len(rows)} iterations, engine {summary.get('engine', '?')}, {cfg.get('prompts', '?')} prompts x "
          f"{cfg.get('group', '?')} rollouts, K = {cfg.get('steps_per_rollout', '?')}")
    print(f"# training: {total:.0f} s wall, {cpu:.0f} s process CPU (CPU/wall {cpu / total:.2f})")
    print("| part | wall s per iteration | share |")
    print("|---|---:|---:|")
    for k in PARTS:
        print(f"| {k} | {wall[k] / len(rows):.2f} | {wall[k] / total:.1%} |")
    print(f"| total | {total / len(rows):.2f} | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
