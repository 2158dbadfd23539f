"""Merge the units' results into one table (CSV and Markdown) and one plot (PNG); the shards of a unit are
merged into its metrics first (merge.py)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ray_jobs.merge import MergeError, merge
from ray_jobs.plan import Unit

COLUMNS = ("checkpoint", "block_size", "task", "metric", "value", "stderr", "shards", "estimator", "status")
# The metric each task is plotted by, and the reference line drawn beside it.
PLOT_METRICS = {"word_perplexity": "true_word_perplexity"}


def _estimator(model_args: str) -> str:
    """The likelihood estimator the unit's model args select, as name/passes (e.g. auto/16, mc/4)."""
    from bd3_plugin.likelihood.estimators import choose_estimator

    args = dict(part.split("=", 1) for part in model_args.split(",") if "=" in part)
    ints = {k: int(args[k]) if args.get(k, "").strip().isdigit() else None for k in ("passes", "mc_samples")}
    try:
        return str(choose_estimator(args.get("estimator"), ints["passes"], ints["mc_samples"]))
    except ValueError:
        return "invalid"


def _read(unit: Unit, out: Path) -> dict:
    path = unit.result_path(out)
    return json.loads(path.read_text()) if path.is_file() else {"status": "missing"}


def _metrics(shards: list[Unit], out: Path) -> tuple[dict, list[dict] | str]:
    """(one shard's record, the unit's metric rows) or (that record, the error) for the shards of one unit."""
    records = [_read(u, out) for u in shards]
    for unit, record in zip(shards, records):
        if record.get("status") != "ok":
            where = f"shard {unit.shard + 1}/{unit.shards}: " if unit.shards > 1 else ""
            return record, where + record.get("error", record["status"])
    if len(records) == 1 and "metrics" in records[0]:
        return records[0], [m | {"shards": 1} for m in records[0]["metrics"]]
    try:
        return records[0], merge(records)
    except MergeError as err:
        return records[0], f"MergeError: {err}"


def rows(units: list[Unit], out: Path) -> list[dict]:
    """One row per metric of each (checkpoint, task group), its shards merged."""
    groups: dict[Unit, list[Unit]] = {}
    for unit in units:
        groups.setdefault(unit.whole, []).append(unit)
    table = []
    for whole, shards in groups.items():
        record, metrics = _metrics(shards, out)
        base = {"checkpoint": Path(whole.checkpoint).name or whole.checkpoint, "block_size": record.get("block_size"),
                "estimator": _estimator(whole.model_args), "shards": len(shards)}
        if isinstance(metrics, str):
            table += [base | {"task": t, "metric": "error", "value": metrics, "stderr": None, "status": "failed"}
                      for t in whole.tasks]
            continue
        table += [base | m | {"status": "ok"} for m in metrics]
    # Block size first: the table reads as the interpolation from AR (L' = 1) to diffusion.
    return sorted(table, key=lambda r: (r["block_size"] is None, r["block_size"] or 0, r["checkpoint"], r["task"]))


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def markdown(table: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in table]
    return "\n".join(lines)


def write_table(table: list[dict], out: Path) -> tuple[Path, Path]:
    csv_path = out / "results.csv"
    md_path = out / "results.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    md_path.write_text(markdown(table) + "\n")
    return csv_path, md_path


def plot(table: list[dict], out: Path) -> Path | None:
    """Perplexity bound against block size, one line per task, the exact value as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    reference: dict[str, float] = {}
    for r in table:
        if r["status"] == "ok" and r["block_size"] is not None:
            if r["metric"] in PLOT_METRICS:
                series.setdefault(r["task"], []).append((r["block_size"], r["value"]))
            if r["metric"] in PLOT_METRICS.values():
                reference[r["task"]] = r["value"]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for task, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{task} (NELBO bound)")
        if task in reference:
            ax.axhline(reference[task], linestyle="--", color="gray", label=f"{task} (exact, source)")
    ax.set_xscale("log", base=2)
    sizes = sorted({p[0] for points in series.values() for p in points})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("block size L' (1 = autoregressive, L = MDLM)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    ax.set_title("Block diffusion: from AR to diffusion")
    fig.tight_layout()
    path = out / "plot.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
