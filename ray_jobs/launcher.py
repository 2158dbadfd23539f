"""Fan the units of a sweep out over a Ray cluster (or a local Ray instance), consume them as they finish,
retry units whose worker died, and never rerun a unit whose result is already on disk."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ray_jobs.cluster import connect
from ray_jobs.plan import Unit, status
from ray_jobs.unit import run_unit, write_atomic


def auto_shards(address: str | None, num_cpus: int | None, gpus_per_unit: float | None) -> int:
    """One shard per unit the cluster can run at once: its GPUs over the GPUs of a unit when units take
    GPUs, else its CPUs (a CPU unit takes one)."""
    resources = connect(address, num_cpus).cluster_resources()
    per_unit = unit_gpus(resources, gpus_per_unit)
    workers = resources.get("GPU", 0) // per_unit if per_unit else resources.get("CPU", 1)
    return max(1, int(workers))


def unit_gpus(resources: dict, gpus_per_unit: float | None) -> float:
    """The GPUs a unit takes: as asked, else one on a cluster with GPUs and none on one without."""
    if gpus_per_unit is not None:
        return gpus_per_unit
    return 1 if resources.get("GPU", 0) else 0


def _attempts(unit: Unit, out: str | Path) -> Path:
    return Path(out) / "units" / unit.key / "attempts"


def _remote_unit(unit: Unit, out: str, device: str) -> dict:
    import os

    import ray

    # Provenance, one file per attempt: the Ray node, since the nodes of a cluster may share a host name.
    where = {"node": ray.get_runtime_context().get_node_id(), "host": os.uname().nodename, "pid": os.getpid()}
    write_atomic(_attempts(unit, out) / f"{where['host']}-{where['pid']}", where)
    return run_unit(unit, out, device)


def _attempt_files(unit: Unit, out: str | Path) -> set[Path]:
    folder = _attempts(unit, out)
    return set(folder.glob("[!.]*")) if folder.is_dir() else set()  # not a temporary file of write_atomic


def _retried(files: set[Path]) -> str:
    """'' for one attempt; else how many, and on which nodes, oldest first (a node id's first 8 digits)."""
    if len(files) < 2:
        return ""
    nodes = [json.loads(f.read_text() or "{}").get("node") or "?"
             for f in sorted(files, key=lambda f: f.stat().st_mtime_ns)]
    return f"; {len(files)} attempts, on nodes {', '.join(n[:8] for n in nodes)}"


def run_sweep(units: list[Unit], out: Path, *, address: str | None = None, gpus_per_unit: float | None = None,
              num_cpus: int | None = None, max_retries: int = 2, progress: bool = True) -> dict[str, int]:
    """Run every unit that has no successful result yet; returns counts by outcome."""
    pending = [u for u in units if status(u, out) != "done"]
    counts = {"done": len(units) - len(pending), "failed": 0, "ran": 0}
    if not pending:
        return counts
    ray = connect(address, num_cpus)
    per_unit = unit_gpus(ray.cluster_resources(), gpus_per_unit)
    device = "cuda" if per_unit else "cpu"
    task = ray.remote(num_cpus=1, num_gpus=per_unit, max_retries=max_retries)(_remote_unit)
    earlier = {u: _attempt_files(u, out) for u in pending}  # of earlier sweeps into the same folder
    refs = {task.remote(u, str(out), device): u for u in pending}
    started = time.time()
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        for ref in ready:
            unit = refs.pop(ref)
            try:
                ok = ray.get(ref)["status"] == "ok"
            except Exception as err:  # the worker died more than max_retries times, or Ray failed
                write_atomic(unit.result_path(out), {"key": unit.key, "status": "error",
                                                     "error": f"{type(err).__name__}: {err}".splitlines()[0]})
                ok = False
            counts["ran"] += 1
            counts["done" if ok else "failed"] += 1
            if progress:
                print(f"[{time.time() - started:6.1f}s] {'done' if ok else 'FAILED'} {unit.key}  "
                      f"(done {counts['done']}, running {len(refs)}, failed {counts['failed']}"
                      f"{_retried(_attempt_files(unit, out) - earlier[unit])})",
                      file=sys.stderr, flush=True)
    return counts
