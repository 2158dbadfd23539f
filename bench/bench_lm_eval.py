"""loglikelihood requests per second: the `bd3` lm-eval adapter (batched, length-sorted) against a naive
loop that scores one request at a time, on the same bundled checkpoint and the same requests.

    python bench/bench_lm_eval.py [--requests 256] [--estimator auto] [--passes 16] [--mc-samples K] \
        [--batch-size 32] [--shape documents|words]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
from lm_eval.api.instance import Instance

from bd3_plugin.likelihood.estimators import choose_estimator
from bd3_plugin.evals.lm_eval_adapter import BD3EvalLM
from bd3_plugin.tinyworld.data import checkpoint_path, mc_pairs, read_heldout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--estimator", default=None, help="default: the adapter's (auto)")
    ap.add_argument("--passes", type=int, default=None, help="default: the adapter's (16)")
    ap.add_argument("--mc-samples", type=int, default=None, help="the same as --estimator mc --passes K")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=("documents", "words"), default="documents",
                    help="documents: whole documents after an empty context (synthetic_mc); words: a held-out "
                         "document's first words as context and its next word as continuation (lambada-like)")
    args = ap.parse_args()
    if args.shape == "documents":
        pairs = [("", c + " <eos>") for item in mc_pairs(args.requests // 2 + 1) for c in item["choices"]]
    else:
        docs = [d.text.split() for d in read_heldout()]
        pairs = [(" ".join(w[: 3 + i % 5]), " " + w[3 + i % 5]) for i, w in enumerate(docs) if len(w) > 8]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs[: args.requests])]
    knobs = {k: v for k, v in (("estimator", args.estimator), ("passes", args.passes),
                                ("mc_samples", args.mc_samples)) if v is not None}
    common = dict(pretrained=str(checkpoint_path(args.block_size)), device=args.device, **knobs)
    batched = BD3EvalLM(**common, batch_size=args.batch_size)
    naive = BD3EvalLM(**common, batch_size=1)
    print(f"# {platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}, checkpoint tiny-bd3-L{args.block_size}, {len(reqs)} requests, "
          f"estimator {choose_estimator(args.estimator, args.passes, args.mc_samples)}, {args.shape}")
    batched.loglikelihood(reqs[:8], disable_tqdm=True)  # warm-up

    start = time.perf_counter()
    fast = batched.loglikelihood(reqs, disable_tqdm=True)
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    slow = [naive.loglikelihood([r], disable_tqdm=True)[0] for r in reqs]  # one request per call
    t_naive = time.perf_counter() - start
    worst = max(abs(a[0] - b[0]) for a, b in zip(fast, slow))
    print(f"adapter, batch {args.batch_size}: {len(reqs) / t_batched:8.1f} req/s   naive loop: "
          f"{len(reqs) / t_naive:8.1f} req/s   ratio {t_naive / t_batched:5.2f}x   (max |Δ score| {worst:.2e})")


if __name__ == "__main__":
    main()
