"""`bd3-sweep` on a local Ray instance: the merged table, a killed worker, an interrupted sweep, bad input."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bd3_plugin.tinyworld.data import checkpoint_path
from ray_jobs.plan import Unit, plan, status
from ray_jobs.unit import run_unit

pytestmark = pytest.mark.cluster
SWEEP = str(Path(sys.executable).with_name("bd3-sweep"))
CKPTS = [str(checkpoint_path(1)), str(checkpoint_path(4))]
TASKS = ["synthetic_ppl", "synthetic_mc"]
COMMON = ["--tasks", *TASKS, "--limit", "8", "--num-cpus", "2", "--model-args", "mc_samples=2"]


def sweep(out, *extra, checkpoints=CKPTS, popen=False):
    argv = [SWEEP, "--checkpoints", *checkpoints, "--out", str(out), *COMMON, *extra]
    if popen:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(argv, capture_output=True, text=True, timeout=900)


def units(out=None):
    return plan(CKPTS, [[t] for t in TASKS], model_args="mc_samples=2", limit=8)


def attempts(out, unit):
    folder = unit.result_path(out).parent / "attempts"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def table(out):
    with (out / "results.csv").open() as f:
        return {(r["checkpoint"], r["task"], r["metric"]): r for r in csv.DictReader(f)}


def test_sweep_table_equals_the_units_run_without_ray(tmp_path):
    r = sweep(tmp_path / "ray")
    assert r.returncode == 0, r.stderr[-3000:]
    merged = table(tmp_path / "ray")
    for unit in units():
        plain = run_unit(unit, tmp_path / "plain")  # the same function, no Ray
        assert plain["status"] == "ok"
        for m in plain["metrics"]:
            row = merged[(Path(unit.checkpoint).name, m["task"], m["metric"])]
            assert float(row["value"]) == pytest.approx(m["value"], rel=1e-9)
            assert int(row["block_size"]) == plain["block_size"]
    assert (tmp_path / "ray" / "results.md").read_text().startswith("| checkpoint | block_size |")
    assert (tmp_path / "ray" / "plot.png").stat().st_size > 1000
    assert "word_perplexity" in r.stdout and "true_word_perplexity" in r.stdout


def wait_for(predicate, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail("timed out")


def test_a_killed_worker_is_retried_and_nothing_is_recomputed(tmp_path):
    out = tmp_path / "sweep"
    proc = sweep(out, popen=True)
    first = wait_for(lambda: next((u for u in units() if attempts(out, u)), None))
    pid = int(next((first.result_path(out).parent / "attempts").iterdir()).name.rsplit("-", 1)[1])
    os.kill(pid, signal.SIGKILL)  # the worker dies in the middle of its unit
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert all(status(u, out) == "done" for u in units())
    assert attempts(out, first) == 2 and all(attempts(out, u) == 1 for u in units() if u != first)
    assert len([k for k in table(out) if k[2] in ("word_perplexity", "acc")]) == 4


def test_an_interrupted_sweep_finishes_only_the_missing_units(tmp_path):
    out = tmp_path / "sweep"
    proc = sweep(out, "--num-cpus", "1", popen=True)
    wait_for(lambda: any(status(u, out) == "done" for u in units()))
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the driver stops and takes its local Ray instance down
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err
    finished = [u for u in units() if status(u, out) == "done"]
    assert 0 < len(finished) < 4
    before = {u.key: u.result_path(out).stat().st_mtime_ns for u in finished}
    r = sweep(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(status(u, out) == "done" for u in units())
    assert all(u.result_path(out).stat().st_mtime_ns == before[u.key] and attempts(out, u) == 1 for u in finished)
    assert f"{len(units()) - len(finished)} run now" in r.stderr


def test_bad_input(tmp_path):
    not_bd3 = tmp_path / "llama"
    not_bd3.mkdir()
    (not_bd3 / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = tmp_path / "sweep"
    r = sweep(out, checkpoints=[str(tmp_path / "missing"), str(not_bd3), CKPTS[1]])
    assert r.returncode == 1  # some units failed; the others ran
    rows = table(out)
    assert rows[("missing", "synthetic_ppl", "error")]["value"].startswith("CheckpointError: no checkpoint folder")
    assert "not a BD3-LM config" in rows[("llama", "synthetic_mc", "error")]["value"]
    assert rows[("tiny-bd3-L4", "synthetic_ppl", "word_perplexity")]["status"] == "ok"

    r = sweep(tmp_path / "x", "--tasks", "synthetic_ppl,no_such_task")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "bd3-sweep: error: unknown task(s): no_such_task (not in lm-eval or lm_eval_tasks/)"
    r = sweep(tmp_path / "y", "--address", "127.0.0.1:1")
    assert r.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in r.stderr.strip().splitlines()[-1]
