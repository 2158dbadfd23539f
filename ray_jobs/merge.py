"""A task's metrics from the per-document results of its shards, computed as lm-eval computes them on the
whole task: every (metric, filter)'s per-document values in document order, passed to the task's own
aggregation function (`mean` for accuracies, `weighted_perplexity` and `bits_per_byte` for summed
log-likelihoods over token, word or byte counts) and to lm-eval's `stderr_for_metric`, with the same
bootstrap iterations as `simple_evaluate`. A shard records each metric's aggregation by its name in
lm-eval's registry, so that the merge needs neither the task nor its data set."""
from __future__ import annotations

# simple_evaluate's default; the stderr of bootstrapped aggregations (median, perplexity, …) depends on it.
BOOTSTRAP_ITERS = 100000


class MergeError(ValueError):
    """Shard results that do not make one task (the message is one line for the user)."""


def aggregation_name(fn) -> str:
    """The name under which lm-eval registers the aggregation function `fn`."""
    from lm_eval.api.registry import aggregation_registry, get_aggregation

    name = next((n for n in aggregation_registry.keys() if get_aggregation(n) is fn), None)
    if name is None:
        raise MergeError(f"aggregation {getattr(fn, '__name__', fn)!r} is not in lm-eval's registry; "
                         "a task using it cannot be sharded")
    return name


def _plain(value):
    """A per-document value as JSON keeps it exactly: tuples as lists, float subclasses as floats."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return float(value)
    return value


def task_record(task, logged: list[dict], n_docs: int) -> dict:
    """One shard's record of a task, from lm-eval's logged samples (`log_samples=True`): the per-document
    metric values and each metric's aggregation. `n_docs`: the documents of the whole task (after --limit)."""
    from lm_eval.api.metrics import mean

    aggregations = task.aggregation()
    docs = [{"doc_id": s["doc_id"], "filter": s["filter"], "values": {m: _plain(s[m]) for m in s["metrics"]}}
            for s in logged]
    names = {m for d in docs for m in d["values"]}
    # lm-eval takes the mean of a metric without an aggregation (evaluator_utils)
    return {"n_docs": n_docs, "docs": docs,
            "aggregation": {m: aggregation_name(aggregations.get(m, mean)) for m in sorted(names)}}


def _items(task: str, records: list[dict], n_docs: int) -> dict[tuple[str, str], list]:
    """{(metric, filter): per-document values in document order} over every shard; every document of the
    task exactly once per filter."""
    docs = sorted((d for r in records for d in r["docs"]), key=lambda d: (d["filter"], d["doc_id"]))
    for filt in {d["filter"] for d in docs}:
        ids = [d["doc_id"] for d in docs if d["filter"] == filt]
        if ids != list(range(n_docs)):
            raise MergeError(f"{task}: the shards hold documents {_span(ids)}, not each of 0..{n_docs - 1} once")
    items: dict[tuple[str, str], list] = {}
    for d in docs:
        for metric, value in d["values"].items():
            items.setdefault((metric, d["filter"]), []).append(tuple(value) if isinstance(value, list) else value)
    return items


def _span(ids: list[int]) -> str:
    return f"{ids[:5]}{'…' if len(ids) > 5 else ''} ({len(ids)} in all)"


def merge_task(task: str, records: list[dict], bootstrap_iters: int = BOOTSTRAP_ITERS) -> list[dict]:
    """Rows of (task, metric, value, stderr) for one task from all its shards' records, as `metrics_of`
    reads them from lm-eval's results of the unsharded run (a stderr lm-eval reports as N/A is None)."""
    from lm_eval.api.metrics import stderr_for_metric
    from lm_eval.api.registry import get_aggregation

    sizes = sorted({r["n_docs"] for r in records})
    if len(sizes) != 1:
        raise MergeError(f"{task}: the shards disagree on the task's size ({sizes})")
    items = _items(task, records, sizes[0])
    aggregation = {m: a for r in records for m, a in r["aggregation"].items()}
    rows = []
    for (metric, _), values in sorted(items.items()):
        fn = get_aggregation(aggregation[metric])
        # as evaluator_utils does: fewer bootstrap draws for the slow translation metrics
        iters = min(bootstrap_iters, 100) if metric in ("bleu", "chrf", "chrf++", "ter") else bootstrap_iters
        stderr_fn = stderr_for_metric(fn, iters)
        stderr = stderr_fn(values) if stderr_fn and len(values) > 1 else None
        rows.append({"task": task, "metric": metric, "value": fn(values), "stderr": stderr})
    return rows


def merge(shards: list[dict]) -> list[dict]:
    """Rows for every task of a unit from its shards' results (`tasks`: {task: record}), each row with the
    number of shards it came from."""
    tasks = sorted({t for s in shards for t in s["tasks"]})
    return [row | {"shards": len(shards)} for t in tasks
            for row in merge_task(t, [s["tasks"][t] for s in shards if t in s["tasks"]])]
