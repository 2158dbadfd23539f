"""Side-by-side timings of the core on one tiny model, in one run.

1. NELBO: the vectorised x_t ⊕ x_0 pass against a loop of one forward per block (16 blocks).
2. Sampling: the batched sampler at batch 16 against batch 1 (generated tokens per second).

    python bench/bench_core.py [--threads N] [--device cuda] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from bd3_plugin.generate import SamplerConfig, generate
from bd3_plugin.nelbo import nelbo_terms
from bd3_plugin.noise import seeded_generators
from bench_model import bench_model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # CUDA kernels run asynchronously: time the work, not its launch


def best_of(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = bench_model(args.device, getattr(torch, args.dtype))
    cfg = model.config
    print(f"# machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}, {args.dtype}")
    print(f"# model: {cfg.n_blocks} layers × {cfg.hidden_dim}, vocab {cfg.vocab_size}, L={cfg.model_length}, "
          f"L'={cfg.block_size} ({cfg.num_blocks} blocks)")

    x = torch.randint(0, 1000, (8, cfg.model_length), generator=torch.Generator().manual_seed(1)).to(args.device)
    with torch.no_grad():
        vec = best_of(lambda: nelbo_terms(model, x, seeded_generators(range(8))), args.repeats, args.device)
        loop = best_of(lambda: nelbo_terms(model, x, seeded_generators(range(8)), vectorized=False), args.repeats, args.device)
    print(f"nelbo  batch 8 × {cfg.model_length}: vectorised {vec * 1e3:8.1f} ms   per-block loop "
          f"{loop * 1e3:8.1f} ms   ratio {loop / vec:5.2f}x")

    sampler = SamplerConfig(algorithm="first_hitting", max_new_tokens=64, top_p=0.9)
    prompt = list(range(1, 21))

    def run(batch: int) -> float:
        sync(args.device)
        start = time.perf_counter()
        out = generate(model, [prompt] * batch, sampler, seeded_generators(range(batch)))
        sync(args.device)
        tokens = sum(len(g.tokens) for g in out.generations)
        return tokens / (time.perf_counter() - start)

    run(1)
    tps1 = max(run(1) for _ in range(args.repeats))
    tps16 = max(run(16) for _ in range(args.repeats))
    print(f"sample first_hitting, 64 new tokens: batch 1 {tps1:8.1f} tok/s   batch 16 {tps16:8.1f} tok/s   "
          f"ratio {tps16 / tps1:5.2f}x")


if __name__ == "__main__":
    main()
