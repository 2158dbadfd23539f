"""Wall time of a sweep (4 bundled checkpoints x 2 tasks) through Ray against the same units run one after
another in one process, side by side in one run.

    python bench/bench_sweep.py [--limit 100] [--num-cpus 2]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from bd3_plugin.tinyworld.data import bundled_checkpoints
from ray_jobs.launcher import run_sweep
from ray_jobs.plan import plan
from ray_jobs.unit import run_unit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()
    units = plan([str(p) for p in bundled_checkpoints()], [["synthetic_ppl"], ["synthetic_mc"]],
                 model_args="mc_samples=2", limit=args.limit)
    print(f"# {platform.machine()}, {os.cpu_count()} cores; {len(units)} units (4 checkpoints x 2 tasks), "
          f"limit {args.limit}, mc_samples 2")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for unit in units:
            assert run_unit(unit, Path(tmp) / "serial")["status"] == "ok"
        serial = time.perf_counter() - start
        start = time.perf_counter()
        counts = run_sweep(units, Path(tmp) / "ray", num_cpus=args.num_cpus, progress=False)
        ray_time = time.perf_counter() - start
    assert counts["failed"] == 0
    print(f"one process, one unit after another: {serial:6.1f} s")
    print(f"Ray, local instance of {args.num_cpus} CPUs (start-up included): {ray_time:6.1f} s   "
          f"ratio serial / Ray: {serial / ray_time:4.2f}x")


if __name__ == "__main__":
    main()
