"""Run one unit: lm-eval with `--model bd3` on one checkpoint and one task group, or on one shard of the
group's documents. The same function runs inside a Ray task or on its own; its result lands atomically at
the unit's deterministic path."""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from ray_jobs.merge import task_record
from ray_jobs.plan import TASKS_DIR, Unit, shard_range


def write_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def task_manager(tasks: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    return TaskManager(include_path=str(TASKS_DIR))  # lm-eval's own tasks too (slower to index)


def metrics_of(results: dict) -> list[dict]:
    """lm-eval's results -> rows of (task, metric, value, stderr)."""
    rows = []
    for task, values in sorted(results.get("results", {}).items()):
        for name, value in values.items():
            if "," not in name or name.endswith("_stderr") or "_stderr," in name or not isinstance(value, (int, float)):
                continue
            metric, filt = name.split(",", 1)
            stderr = values.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "value": value,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None})
    return rows


def shard_tasks(unit: Unit, manager) -> dict:
    """{task name: (Task, its documents in this shard, the task's documents)} for every leaf task of the
    group (tags and groups expand to their tasks), the documents after --limit."""
    out = {}
    for name, task in sorted(manager.load(list(unit.tasks))["tasks"].items()):
        n_docs = len(task.eval_docs)
        n_docs = n_docs if unit.limit is None else min(n_docs, unit.limit)
        out[name] = (task, list(shard_range(n_docs, unit.shard, unit.shards)), n_docs)
    return out


def evaluate_shard(unit: Unit, args: str, device: str) -> dict:
    """Per-document results of the unit's shard of every task, for the merge (merge.py). A task with no
    document in this shard is not run; lm-eval would take an empty index list for the whole task."""
    import lm_eval

    manager = task_manager(unit.tasks)
    tasks = shard_tasks(unit, manager)
    samples = {name: docs for name, (_, docs, _) in tasks.items() if docs}
    logged = {}
    if samples:
        results = lm_eval.simple_evaluate(model="bd3", model_args=args, tasks=[tasks[n][0] for n in samples],
                                          samples=samples, batch_size=unit.batch_size, device=device,
                                          task_manager=manager, log_samples=True)
        logged = results["samples"]
    return {"tasks": {name: task_record(task, logged.get(name, []), n_docs)
                      for name, (task, _, n_docs) in tasks.items()}}


def evaluate(unit: Unit, device: str) -> dict:
    import lm_eval

    from bd3_plugin.core.checkpoint import read_config, checkpoint_folder

    cfg = read_config(checkpoint_folder(unit.checkpoint))  # a clear error for a missing or non-BD3 checkpoint
    args = f"pretrained={unit.checkpoint}" + (f",{unit.model_args}" if unit.model_args else "")
    shape = {"block_size": cfg.block_size, "model_length": cfg.model_length}
    if unit.shards > 1:
        return shape | evaluate_shard(unit, args, device)
    results = lm_eval.simple_evaluate(model="bd3", model_args=args, tasks=list(unit.tasks), limit=unit.limit,
                                      batch_size=unit.batch_size, device=device,
                                      task_manager=task_manager(unit.tasks), log_samples=False)
    return shape | {"metrics": metrics_of(results)}


def run_unit(unit: Unit, out: str | Path, device: str = "cpu") -> dict:
    """Evaluate and record the unit. An application error is recorded with its message, not raised."""
    from dataclasses import asdict

    start = time.time()
    record = {"unit": asdict(unit), "key": unit.key, "host": os.uname().nodename, "pid": os.getpid()}
    try:
        record |= {"status": "ok", **evaluate(unit, device)}
    except Exception as err:  # the sweep goes on; the message says what went wrong
        record |= {"status": "error", "error": f"{type(err).__name__}: {err}".splitlines()[0],
                   "traceback": traceback.format_exc(limit=5)}
    except SystemExit as err:  # the adapter's one-line exits under a CLI
        record |= {"status": "error", "error": f"exited with status {err.code}"}
    record["seconds"] = round(time.time() - start, 2)
    write_atomic(unit.result_path(Path(out)), record)
    return record
