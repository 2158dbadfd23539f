"""synthetic_mc accuracy against 2L passes per choice for the exact, stratified and mc estimators, and
loglikelihood requests per second of the adapter at the default estimator against mc with one sample.

    python bench/bench_estimators.py [--items 200] [--block-sizes 4,16,128] [--passes 1,4,16] [--rps-items 50]

Each item's two choices are scored as lm-eval scores them (`loglikelihood` of " choice <eos>" after an
empty context, common random numbers), so the accuracy is the task's `acc`.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch
from lm_eval.api.instance import Instance

from bd3_plugin.likelihood.estimators import Estimator, exact_passes
from bd3_plugin.evals.lm_eval_adapter import BD3EvalLM
from bd3_plugin.likelihood.scoring import eval_interval
from bd3_plugin.tinyworld.data import checkpoint_path, mc_pairs


def requests(items: list[dict]) -> list[Instance]:
    return [Instance("loglikelihood", {}, ("", " " + c + " <eos>"), i)
            for it in items for i, c in enumerate(it["choices"])]


def accuracy(lm: BD3EvalLM, items: list[dict]) -> float:
    ll = [x for x, _ in lm.loglikelihood(requests(items), disable_tqdm=True)]
    return sum((ll[2 * i + 1] > ll[2 * i]) == bool(it["label"]) for i, it in enumerate(items)) / len(items)


def accuracy_table(items: list[dict], block_sizes: list[int], passes: list[int], names: list[str]) -> list[str]:
    lines = ["| L' | estimator | " + " | ".join(f"{p} passes" for p in passes) + " |",
             "|---:|---|" + "---:|" * len(passes)]
    for size in block_sizes:
        lm = BD3EvalLM(pretrained=str(checkpoint_path(size)), greedy_check=False)
        a, b = eval_interval(lm.model.config.block_size)
        for name in names:
            cells = []
            for p in passes:
                if name == "exact" and exact_passes(size, a, b) > p:
                    cells.append("—")  # a full block does not fit in p passes
                    continue
                lm.args = dataclasses.replace(lm.args, estimator=name, passes=p, mc_samples=None)
                cells.append(f"{accuracy(lm, items):.3f}")
            lines.append(f"| {size} | {name} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines


def throughput(items: list[dict], block_sizes: list[int]) -> list[str]:
    """Requests per second, lm-eval's defaults otherwise (greedy check on), both settings in one loop."""
    reqs = requests(items)
    lines = ["| L' | mc, 1 pass (req/s) | default auto/16 (req/s) | cost ratio |", "|---:|---:|---:|---:|"]
    for size in block_sizes:
        seconds = {}
        for label, est in (("mc", Estimator("mc", 1)), ("default", Estimator())):
            lm = BD3EvalLM(pretrained=str(checkpoint_path(size)), estimator=est.name, passes=est.passes)
            lm.loglikelihood(reqs[:4], disable_tqdm=True)  # warm-up
            start = time.perf_counter()
            lm.loglikelihood(reqs, disable_tqdm=True)
            seconds[label] = time.perf_counter() - start
        lines.append(f"| {size} | {len(reqs) / seconds['mc']:.1f} | {len(reqs) / seconds['default']:.1f} | "
                     f"{seconds['default'] / seconds['mc']:.1f}x |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200, help="synthetic_mc items (of 200) for the accuracy table")
    ap.add_argument("--block-sizes", default="4,16,128")
    ap.add_argument("--passes", default="1,4,16")
    ap.add_argument("--estimators", default="exact,stratified,mc")
    ap.add_argument("--rps-items", type=int, default=50, help="items (two requests each) for requests/s; 0: skip")
    args = ap.parse_args()
    sizes = [int(s) for s in args.block_sizes.split(",")]
    passes = [int(p) for p in args.passes.split(",")]
    items = mc_pairs()
    print(f"# {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"synthetic_mc: {args.items} items for accuracy, {args.rps_items} for requests/s")
    table = accuracy_table(items[: args.items], sizes, passes, args.estimators.split(","))
    print("\n".join(["", *table]))
    if args.rps_items:
        print("\n".join(["", *throughput(items[: args.rps_items], sizes)]))


if __name__ == "__main__":
    main()
