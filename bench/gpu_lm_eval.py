"""The lm-eval adapter on the bundled tasks, on one device against the CPU, without lm-eval's task loader.

The adapter gets the requests lm-eval builds for the three local tasks (`synthetic_mc`: loglikelihood of
each choice after an empty context; `synthetic_ppl`: loglikelihood_rolling of held-out documents;
`synthetic_gen`: generate_until at temperature 0) and the script prints each task's metric on `--device`
and on the CPU, and how far apart they are. Only `lm_eval.api` is needed (no datasets, no task files),
so it runs where the full lm-eval stack is not installed.

    python bench/gpu_lm_eval.py --device cuda [--dtype bfloat16] [--limit 64]
"""
from __future__ import annotations

import argparse
import math
import time

from lm_eval.api.instance import Instance

from bd3_plugin.evals.lm_eval_adapter import BD3EvalLM
from bd3_plugin.tinyworld.data import BLOCK_SIZES, checkpoint_path, generation_prompts, mc_pairs, read_heldout
from bd3_plugin.tinyworld.grammar import Source, text_words


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def run_tasks(lm: BD3EvalLM, limit: int) -> dict[str, object]:
    pairs = mc_pairs()[:limit]
    choices = [(p, c) for p in pairs for c in p["choices"]]
    scores = lm.loglikelihood(requests("loglikelihood", [("", " " + c + " <eos>") for _, c in choices]))
    acc = []
    k = 0
    for p in pairs:
        ll = [s[0] for s in scores[k:k + len(p["choices"])]]
        k += len(p["choices"])
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == p["label"]))
    docs = read_heldout()[:limit]
    rolling = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d.text + " <eos>",) for d in docs]))
    ppl = math.exp(-sum(rolling) / sum(d.tokens for d in docs))
    prompts = generation_prompts()[:limit]
    gen = lm.generate_until(requests("generate_until", [(p["prompt"], {"until": ["<eos>"], "max_gen_toks": 64,
                                                                        "do_sample": False}) for p in prompts]))
    source = Source()
    valid = [float(source.is_valid(text_words(p["prompt"] + " " + g))) for p, g in zip(prompts, gen)]
    return {"mc_acc": sum(acc) / len(acc), "mc_scores": [s[0] for s in scores], "word_ppl": ppl,
            "gen_valid": sum(valid) / len(valid), "gen": gen}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--limit", type=int, default=64)
    args = ap.parse_args()
    print(f"{'L_':>4} {'device':>7} {'dtype':>9} {'mc acc':>7} {'word ppl':>9} {'gen valid':>9} {'s':>6}   "
          f"vs cpu float32: max |Δ loglik|, gen identical")
    for block_size in BLOCK_SIZES:
        results = {}
        for device, dtype in (("cpu", "float32"), (args.device, args.dtype)):
            lm = BD3EvalLM(pretrained=str(checkpoint_path(block_size)), device=device, dtype=dtype)
            start = time.perf_counter()
            r = run_tasks(lm, args.limit)
            results[device, dtype] = r
            elapsed = time.perf_counter() - start
            line = (f"{block_size:>4} {device:>7} {dtype:>9} {r['mc_acc']:7.3f} {r['word_ppl']:9.4f} "
                    f"{r['gen_valid']:9.3f} {elapsed:6.1f}")
            if (device, dtype) != ("cpu", "float32"):
                ref = results["cpu", "float32"]
                delta = max(abs(a - b) for a, b in zip(r["mc_scores"], ref["mc_scores"]))
                same = sum(a == b for a, b in zip(r["gen"], ref["gen"])) / len(r["gen"])
                line += f"   {delta:.2e}, {same:.0%}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
