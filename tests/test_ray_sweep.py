"""`bd3-sweep` on Ray: a sharded sweep on a cluster of three nodes (tests/local_cluster.py) that loses a worker
node, an interrupted sweep and a sweep with a failing unit on local instances, bad input (the mistakes caught
before Ray starts are checked through `main(argv)` in this process)."""
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from bd3_plugin.core.checkpoint import read_config
from bd3_plugin.core.config import ConfigError
from bd3_plugin.tinyworld.data import checkpoint_path
from early import early_fixture
from local_cluster import LocalCluster
from ray_jobs import cluster, launcher
from ray_jobs.cli import main
from ray_jobs.plan import Unit, plan, split, status
from ray_jobs.unit import run_unit

SWEEP = str(Path(sys.executable).with_name("bd3-sweep"))
CKPTS = [str(checkpoint_path(1)), str(checkpoint_path(4))]
TASKS = ["synthetic_ppl", "synthetic_mc"]
COMMON = ["--tasks", *TASKS, "--limit", "8", "--num-cpus", "2", "--model-args", "mc_samples=2"]


# One unit of three tasks, one per kind of metric: summed log-likelihoods over counts, accuracies, and the
# zero-shot protocol's rows (corpora of 20 documents); four documents of each.
SHARDED = Unit(CKPTS[1], ("synthetic_ppl", "synthetic_mc", "synthetic_ppl_rows_batched"), "mc_samples=2", limit=4)


def sweep(out, *extra, checkpoints=CKPTS, popen=False, env=None):
    argv = [SWEEP, "--checkpoints", *checkpoints, "--out", str(out), *COMMON, *extra]
    if popen:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env)
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)


def sharded(shards: int) -> list[str]:
    """The arguments that make `sweep` run SHARDED's tasks in `shards` shards."""
    return ["--tasks", ",".join(SHARDED.tasks), "--limit", str(SHARDED.limit), "--shards", str(shards)]


def units(out=None):
    return plan(CKPTS, [[t] for t in TASKS], model_args="mc_samples=2", limit=8)


def attempts(out, unit):
    folder = unit.result_path(out).parent / "attempts"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def attempt_records(out, unit) -> list[dict]:
    """The unit's attempts, oldest first, each {"node": Ray node id, "host", "pid"} (a file still being
    written is left out)."""
    folder = unit.result_path(out).parent / "attempts"
    files = sorted(folder.glob("[!.]*"), key=lambda f: f.stat().st_mtime_ns) if folder.is_dir() else []
    return [json.loads(f.read_text()) for f in files]


def table(out):
    with (out / "results.csv").open() as f:
        return {(r["checkpoint"], r["task"], r["metric"]): r for r in csv.DictReader(f)}


def wait_for(predicate, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    pytest.fail("timed out")


@early_fixture(lane="ray")
def node_loss_sweep(folder):
    """SHARDED in three shards on a cluster of a head and two worker nodes of one CPU each: the worker node
    that the first shard starts on is killed (its raylet, object store and workers, at once) while that shard
    runs. Its namespace: out, the shard (`lost`), the `killed` and `surviving` node ids, stdout, stderr and
    the exit status."""
    out = folder / "sweep"
    shards = split(SHARDED, 3)
    with LocalCluster(folder, workers=2) as cluster:
        proc = sweep(out, *sharded(3), "--address", cluster.address, checkpoints=[SHARDED.checkpoint], popen=True,
                     env=cluster.driver_env)
        try:
            def started():
                return next(((u, tries[0]["node"]) for u in shards if (tries := attempt_records(out, u))
                             and tries[0]["node"] in cluster.workers and not u.result_path(out).exists()), None)
            lost, killed = wait_for(started)
            cluster.kill(killed)
            stdout, stderr = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    (surviving,) = set(cluster.workers) - {killed}
    return types.SimpleNamespace(out=out, lost=lost, killed=killed, surviving=surviving, stdout=stdout,
                                 stderr=stderr, returncode=proc.returncode)


@pytest.mark.cluster
@pytest.mark.cli
def test_a_lost_nodes_shard_finishes_on_the_surviving_node(node_loss_sweep):
    s = node_loss_sweep
    assert s.returncode == 0, s.stderr[-3000:]
    shards = split(SHARDED, 3)
    assert sorted(p.name for p in (s.out / "units").iterdir()) == sorted(u.key for u in shards)
    for u in shards:
        # one whole result each (a torn one would not parse), no temporary file of an unfinished write left
        assert sorted(p.name for p in u.result_path(s.out).parent.iterdir()) == ["attempts", "result.json"]
        result = json.loads(u.result_path(s.out).read_text())
        tries = attempt_records(s.out, u)
        # the lost shard ran again on the surviving node; nothing else ran twice or on the killed node
        assert [t["node"] for t in tries] == ([s.killed, s.surviving] if u == s.lost else [s.surviving]), u.key
        assert result["status"] == "ok" and result["pid"] == tries[-1]["pid"]  # written by the last attempt
    progress = [line for line in s.stderr.splitlines() if re.match(r"\[ *[\d.]+s\] ", line)]
    assert len(progress) == 3 and all(" done " in line for line in progress), progress
    (retried,) = [line for line in progress if "attempts" in line]
    assert s.lost.key in retried and retried.endswith(f"; 2 attempts, on nodes {s.killed[:8]}, {s.surviving[:8]})")
    assert "(raylet)" in s.stderr  # Ray's own report of the lost node, kept out of the table's stream
    assert s.stdout == (s.out / "results.md").read_text()
    assert s.stdout.startswith("| checkpoint | block_size |") and "| true_word_perplexity |" in s.stdout
    assert (s.out / "plot.png").stat().st_size > 1000


@pytest.fixture(scope="session")
def whole_run(tmp_path_factory):
    """SHARDED run whole, without Ray: lm-eval's own metrics of the whole tasks."""
    whole = run_unit(SHARDED, tmp_path_factory.mktemp("whole"))
    assert whole["status"] == "ok", whole.get("traceback")
    return whole


def assert_table_equals(out, whole: dict, shards: int) -> None:
    """The sweep's merged table of SHARDED in `shards` shards holds `whole`'s metrics: every value to 1e-9,
    every stderr the same number."""
    merged = {(r["task"], r["metric"]): r for r in table(out).values() if r["checkpoint"] == "tiny-bd3-L4"}
    assert len(merged) == len(whole["metrics"]) == 7
    for m in whole["metrics"]:
        row = merged[(m["task"], m["metric"])]
        assert float(row["value"]) == pytest.approx(m["value"], rel=1e-9, abs=0), m
        assert (row["stderr"] or None) == (None if m["stderr"] is None else str(m["stderr"])), m
        assert row["shards"] == str(shards) and row["status"] == "ok"
        assert int(row["block_size"]) == whole["block_size"]
    assert any(m["stderr"] for m in whole["metrics"])  # a stderr other than N/A or 0 is compared too


@pytest.mark.cluster
@pytest.mark.cli
def test_the_table_of_a_sweep_that_lost_a_node_equals_the_unsharded_run(node_loss_sweep, whole_run):
    assert_table_equals(node_loss_sweep.out, whole_run, shards=3)


@early_fixture(lane="ray")
def interrupted_sweep(folder):
    """A sweep on one CPU stopped by Ctrl-C once a unit is done, then the same command again."""
    out = folder / "sweep"
    proc = sweep(out, "--num-cpus", "1", popen=True)
    try:
        wait_for(lambda: any(status(u, out) == "done" for u in units()))
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the driver stops and takes its local Ray instance down
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished = [u for u in units() if status(u, out) == "done"]
    before = {u.key: u.result_path(out).stat().st_mtime_ns for u in finished}
    return out, proc.returncode, err, finished, before, sweep(out)


@pytest.mark.cluster
@pytest.mark.cli
def test_an_interrupted_sweep_finishes_only_the_missing_units(interrupted_sweep):
    out, returncode, err, finished, before, r = interrupted_sweep
    assert returncode == 130 and "interrupted" in err
    assert 0 < len(finished) < 4
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(status(u, out) == "done" for u in units())
    assert all(u.result_path(out).stat().st_mtime_ns == before[u.key] and attempts(out, u) == 1 for u in finished)
    assert f"{len(units()) - len(finished)} run now" in r.stderr


@early_fixture(lane="ray")
def bad_checkpoints_sweep(folder):
    """A checkpoint whose config reads but whose weights are missing (found only when its unit loads it) beside
    a good one, swept without --address while RAY_ADDRESS names a port where no cluster listens; the tasks
    of SHARDED in two shards, so that the sharded tests read the good checkpoint's shards."""
    no_weights = folder / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(CKPTS[1]) / name, no_weights / name)
    out = folder / "sweep"
    return out, sweep(out, *sharded(2), checkpoints=[str(no_weights), SHARDED.checkpoint],
                      env=os.environ | {"RAY_ADDRESS": "127.0.0.1:1"})


@pytest.mark.cluster
@pytest.mark.cli
def test_a_failing_unit_is_recorded_and_the_others_run_on_a_new_local_instance(bad_checkpoints_sweep):
    out, r = bad_checkpoints_sweep
    assert r.returncode == 1, r.stderr[-3000:]  # some units failed; the others ran, on an instance of its own
    assert "4 units (2 × 2 shards) (4 run now, 2 failed)" in r.stderr
    rows = table(out)
    error = rows[("no-weights", "synthetic_ppl", "error")]["value"]
    assert error.startswith("shard 1/2: CheckpointError: no model.safetensors"), error
    assert rows[("tiny-bd3-L4", "synthetic_ppl", "word_perplexity")]["status"] == "ok"
    # an application error is not a lost worker: each failing shard ran once and is reported once
    for unit in plan([str(out.parent / "no-weights")], [list(SHARDED.tasks)], model_args=SHARDED.model_args,
                     limit=SHARDED.limit, shards=2):
        result = json.loads(unit.result_path(out).read_text())
        assert result["status"] == "error" and result["error"].startswith("CheckpointError: no model.safetensors")
        assert attempts(out, unit) == 1 and r.stderr.count(f"FAILED {unit.key} ") == 1, unit.key


@pytest.mark.cluster
@pytest.mark.cli
def test_sharded_table_equals_the_unsharded_run(bad_checkpoints_sweep, whole_run):
    assert_table_equals(bad_checkpoints_sweep[0], whole_run, shards=2)


@pytest.mark.cluster
@pytest.mark.cli
def test_a_document_scores_the_same_in_any_shard(bad_checkpoints_sweep, node_loss_sweep):
    """Document 1 shares a shard with document 0 in a split in two, and is alone in a split in three."""
    in_two = json.loads(split(SHARDED, 2)[0].result_path(bad_checkpoints_sweep[0]).read_text())
    alone = json.loads(split(SHARDED, 3)[1].result_path(node_loss_sweep.out).read_text())
    for task, record in alone["tasks"].items():
        (doc,) = record["docs"]
        assert doc["doc_id"] == 1
        assert doc == next(d for d in in_two["tasks"][task]["docs"] if d["doc_id"] == 1), task


class Done:
    """The object reference of a unit that has already run (hashable, as Ray's are)."""

    def __init__(self, value):
        self.value = value


def synchronous_ray(calls: list):
    """A stand-in for Ray that runs each submitted unit at once in this process, recording its unit."""
    def remote(**options):
        def wrap(fn):
            return types.SimpleNamespace(remote=lambda unit, *args: calls.append(unit) or Done(fn(unit, *args)))
        return wrap
    return types.SimpleNamespace(init=lambda **kw: None, cluster_resources=lambda: {"CPU": 2.0}, remote=remote,
                                 wait=lambda refs, num_returns: (refs[:1], refs[1:]), get=lambda ref: ref.value,
                                 get_runtime_context=lambda: types.SimpleNamespace(get_node_id=lambda: "this process"))


@pytest.mark.cluster
@pytest.mark.cli
def test_a_sharded_sweep_resumes_per_shard(bad_checkpoints_sweep, tmp_path, monkeypatch):
    """The sweep's result folder with the second shard's result deleted: only that shard runs again."""
    out = bad_checkpoints_sweep[0]
    resumed = tmp_path / "sweep"
    shutil.copytree(out, resumed)
    shards = split(SHARDED, 2)
    written = json.loads(shards[1].result_path(resumed).read_text())
    kept = shards[0].result_path(resumed).stat().st_mtime_ns
    shards[1].result_path(resumed).unlink()
    calls = []
    monkeypatch.setitem(sys.modules, "ray", synchronous_ray(calls))
    assert launcher.run_sweep(shards, resumed, progress=False) == {"done": 2, "failed": 0, "ran": 1}
    assert calls == [shards[1]] and shards[0].result_path(resumed).stat().st_mtime_ns == kept
    assert json.loads(shards[1].result_path(resumed).read_text())["tasks"] == written["tasks"]
    assert attempts(resumed, shards[0]) == 1 and attempts(resumed, shards[1]) == 2
    assert attempt_records(resumed, shards[1])[-1]["node"] == "this process"  # the node id the stand-in gives


def one_line_error(capsys, argv) -> str:
    """`bd3-sweep ARGV` through `main` in this process: exit status 2 and one line on stderr, returned."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the sweep calls ray.init (to start or join a cluster)."""
    def init(**kwargs):
        raise AssertionError(f"ray.init{kwargs}")
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(init=init, is_initialized=lambda: False))


def test_bad_input_before_ray_starts_is_one_line(capsys, tmp_path, no_ray):
    argv = ["--checkpoints", *CKPTS, *COMMON]
    line = one_line_error(capsys, [*argv, "--out", str(tmp_path / "x"), "--tasks", "synthetic_ppl,no_such_task"])
    assert line == "bd3-sweep: error: unknown task(s): no_such_task (not in lm-eval or lm_eval_tasks/)"
    line = one_line_error(capsys, [*argv, "--out", str(tmp_path / "y"), "--address", "127.0.0.1:1"])
    assert line.startswith("bd3-sweep: error: cannot reach the Ray cluster at 127.0.0.1:1")


def test_bad_checkpoints_before_ray_starts_are_one_line(capsys, tmp_path, no_ray):
    not_bd3 = tmp_path / "llama"
    not_bd3.mkdir()
    (not_bd3 / "config.json").write_text(json.dumps({"model_type": "llama"}))
    bad = [str(tmp_path / "missing"), str(tmp_path / "runs" / "*"), str(not_bd3), str(Path(CKPTS[0]) / "config.json")]
    line = one_line_error(capsys, ["--checkpoints", *bad, CKPTS[0], *COMMON, "--out", str(tmp_path / "out")])
    with pytest.raises(ConfigError) as llama:
        read_config(not_bd3)
    assert line == (f"bd3-sweep: error: no checkpoint folder at {bad[0]}; no checkpoint folder at {bad[1]}; "
                    f"{not_bd3}: {llama.value}; {bad[3]} is a file; expected a checkpoint folder holding config.json")
    assert "not a BD3-LM config: model_type is 'llama'" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_args, message", [
    ("passes=16,mc_sample=2", "--model-args 'passes=16,mc_sample=2': bd3 model_args: unknown key(s) mc_sample; known: "),
    ("passes=0", "--model-args 'passes=0': bd3 model_args: passes must be a positive integer, got 0"),
    ("passes", "--model-args 'passes': bd3 model_args: passes must be a positive integer, got ''"),
    ("protocol=chunks", "--model-args 'protocol=chunks': bd3 model_args: protocol must be one of "),
    ("temperature=hot", "--model-args 'temperature=hot': temperature must be a finite number >= 0, got 'hot'"),
    ("block_size=3", f"--model-args 'block_size=3' with {CKPTS[0]}: block_size 3 does not divide model_length"),
    ("estimator=exact,passes=2", f"--model-args 'estimator=exact,passes=2' with {CKPTS[1]}: exact needs 15 passes"),
    ("batch_size=4,pretrained=x", "--model-args must not set pretrained (set by --checkpoints), batch_size (set by "
                                  "--batch-size)"),
])
def test_bad_model_args_before_ray_starts_are_one_line(capsys, tmp_path, no_ray, model_args, message):
    line = one_line_error(capsys, ["--checkpoints", *CKPTS, "kuleshov-group/bd3lm-owt-block_size4", *COMMON,
                                   "--model-args", model_args, "--out", str(tmp_path / "out")])
    assert line.startswith(f"bd3-sweep: error: {message}"), line


def test_adapter_accepts_what_the_checks_accept(tmp_path):
    """Negative control of the model-args checks: args they pass build the adapter on the same checkpoints."""
    from bd3_plugin.evals.lm_eval_adapter import BD3EvalLM
    from ray_jobs.inputs import check_model_args, local_configs

    model_args = "estimator=exact,passes=16,block_size=2,algorithm=threshold,temperature=0.5"
    check_model_args(model_args, CKPTS, local_configs(CKPTS), batch_size=16)
    with pytest.warns(UserWarning, match="scoring with block_size 2; the checkpoint was trained with 4"):
        lm = BD3EvalLM.create_from_arg_string(f"pretrained={CKPTS[1]},{model_args}", {"batch_size": 16,
                                                                                      "device": "cpu"})
    assert lm.model.config.block_size == 2


def test_without_address_ray_starts_a_new_local_instance(monkeypatch):
    """`ray.init(address=None)` would join RAY_ADDRESS or the last cluster in Ray's temp folder; "local" never does."""
    calls = []
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(init=lambda **kw: calls.append(kw)))
    cluster.connect(None, 2)
    cluster.connect("auto", 2)
    assert [(c["address"], c["num_cpus"]) for c in calls] == [("local", 2), ("auto", None)]
