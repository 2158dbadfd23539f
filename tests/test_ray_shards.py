"""Sharded sweeps without Ray or a model: the split of a task's documents (plan.py), the merge of per-document
values against lm-eval's own aggregation of the whole task (merge.py), and `--shards auto`."""
import json
import random
import sys
import types

import pytest
from lm_eval.api.metrics import bits_per_byte, mean, weighted_perplexity
from lm_eval.evaluator_utils import _compute_task_aggregations

from ray_jobs import launcher
from ray_jobs.merge import MergeError, merge, merge_task, task_record
from ray_jobs.plan import Unit, plan, shard_range


def test_shards_hold_every_document_exactly_once():
    for n_docs in range(0, 23):
        for shards in range(1, 12):  # more shards than documents too
            parts = [shard_range(n_docs, s, shards) for s in range(shards)]
            assert [d for p in parts for d in p] == list(range(n_docs)), (n_docs, shards)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1, (n_docs, shards)
    assert [list(shard_range(5, s, 3)) for s in range(3)] == [[0], [1, 2], [3, 4]]  # uneven: 1 + 2 + 2


def test_shard_units_share_the_whole_units_key():
    units = plan(["a/ckpt"], [["t1"], ["t2", "t3"]], limit=4, shards=3)
    whole = plan(["a/ckpt"], [["t1"], ["t2", "t3"]], limit=4)
    assert len(units) == 6 and len({u.key for u in units}) == 6
    assert [u.whole for u in units] == [whole[0]] * 3 + [whole[1]] * 3
    assert all(u.key.startswith(u.whole.key + "--shard") for u in units)
    assert units[4].key.endswith("--shard2of3") and whole[0].whole == whole[0]
    with pytest.raises(ValueError, match="shard must be in"):
        Unit("a", ("t",), shard=3, shards=3)


class FakeTask:
    """What the merge and lm-eval's aggregation read of a task: its aggregation functions."""
    task_name = "fake"

    def aggregation(self):
        return {"acc": mean, "word_perplexity": weighted_perplexity, "bits_per_byte": bits_per_byte}


def logged_samples(n_docs: int, seed: int) -> list[dict]:
    """Per-document results as lm-eval logs them; `extra` has no aggregation (lm-eval takes the mean)."""
    rng = random.Random(seed)
    out = []
    for doc in range(n_docs):
        values = {"acc": float(rng.random() < 0.6), "word_perplexity": (-rng.uniform(5, 80), rng.randint(3, 30)),
                  "bits_per_byte": (-rng.uniform(5, 80), rng.randint(10, 90)), "extra": rng.gauss(0, 1)}
        out.append({"doc_id": doc, "filter": "none", "metrics": list(values), "doc": {"text": "…"}} | values)
    return out


def shard_records(logged: list[dict], shards: int) -> list[dict]:
    """Each shard's record of the task as a shard unit writes it, through JSON as on disk."""
    n_docs = len(logged)
    return [{"tasks": {"fake": json.loads(json.dumps(task_record(
        FakeTask(), [logged[d] for d in shard_range(n_docs, s, shards)], n_docs)))}} for s in range(shards)]


@pytest.mark.parametrize("n_docs, shards", [(37, 4), (5, 8), (2, 1)])
def test_merge_equals_lm_evals_aggregation_of_the_whole_task(n_docs, shards):
    logged = logged_samples(n_docs, seed=n_docs)
    raw = {}
    for s in logged:
        for metric in s["metrics"]:
            raw.setdefault((metric, "none"), []).append(s[metric])
    expect, _ = _compute_task_aggregations(FakeTask(), raw, bootstrap_iters=100000)
    rows = merge(shard_records(logged, shards))
    assert {r["metric"] for r in rows} == {"acc", "word_perplexity", "bits_per_byte", "extra"}
    for r in rows:
        assert r["value"] == expect[f"{r['metric']},none"] and r["shards"] == shards, r
        stderr = expect[f"{r['metric']}_stderr,none"]
        assert r["stderr"] == (None if stderr == "N/A" else stderr), r
    assert {r["metric"] for r in rows if r["stderr"] is not None} == ({"acc", "extra"} if n_docs > 1 else set())


def test_a_missing_or_repeated_document_is_refused():
    records = shard_records(logged_samples(9, seed=1), 3)
    with pytest.raises(MergeError, match=r"fake: the shards hold documents \[0, 1, 2, 6, 7\]… \(6 in all\)"):
        merge_task("fake", [r["tasks"]["fake"] for r in (records[0], records[2])])
    with pytest.raises(MergeError, match="not each of 0..8 once"):
        merge_task("fake", [r["tasks"]["fake"] for r in (*records, records[1])])
    records[1]["tasks"]["fake"]["n_docs"] = 10
    with pytest.raises(MergeError, match=r"fake: the shards disagree on the task's size \(\[9, 10\]\)"):
        merge(records)


@pytest.mark.parametrize("resources, gpus_per_unit, expect", [
    ({"CPU": 6.0}, None, 6), ({"CPU": 16.0, "GPU": 4.0}, None, 4), ({"CPU": 16.0, "GPU": 4.0}, 0.5, 8),
    ({"CPU": 16.0, "GPU": 4.0}, 0, 16), ({"CPU": 16.0, "GPU": 1.0}, 2, 1)])
def test_auto_shards_are_the_workers_of_the_cluster(monkeypatch, resources, gpus_per_unit, expect):
    fake = types.SimpleNamespace(init=lambda **kw: None, cluster_resources=lambda: resources)
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert launcher.auto_shards(None, None, gpus_per_unit) == expect
