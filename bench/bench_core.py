"""Side-by-side timings of the core on one tiny model, in one run.

1. NELBO: the vectorised x_t ⊕ x_0 pass against a loop of one forward per block (16 blocks).
2. Sampling: the batched sampler at batch 16 against batch 1 (generated tokens per second).
3. Forward passes per generated token and tokens per second of first-hitting at L' = 4 on the bundled
   grammar checkpoint, and (`--released-shape`) on a random-weight model of the released shape
   (12 layers × 768, vocabulary 50,258), where the output layer is a large part of a pass.

    python bench/bench_core.py [--threads N] [--device cuda] [--dtype bfloat16] [--released-shape] [--passes-only]

Run with PYTHONPATH pointing at another checkout to measure that code with the same script.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.core.config import BD3Config
from bd3_plugin.sampling.config import SamplerConfig
from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.model import BD3LM
from bd3_plugin.likelihood.nelbo import nelbo_terms
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.tinyworld.data import checkpoint_path
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
    ap.add_argument("--released-shape", action="store_true", help="also time a random model of the released shape")
    ap.add_argument("--passes-only", action="store_true", help="only part 3 (passes per token)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}, {args.dtype}")
    if not args.passes_only:
        nelbo_and_batching(bench_model(args.device, getattr(torch, args.dtype)), args)
    grammar = load_checkpoint(checkpoint_path(4))
    eos = grammar.encode("<eos>")
    passes_per_token(grammar.model.to(args.device), "grammar tiny-bd3-L4", eos, 63, (1, 16), args)  # 3 + 15 blocks
    if args.released_shape:
        cfg = BD3Config(vocab_size=50258, model_length=1024, block_size=4, hidden_dim=768, n_heads=12, n_blocks=12,
                        cond_dim=128, dropout=0.0)
        with torch.device("cpu"):
            big = BD3LM(cfg)
            big.reset_parameters(torch.Generator().manual_seed(0), adaln_zero=False)
        big = big.eval().to(device=args.device, dtype=getattr(torch, args.dtype))
        passes_per_token(big, "released shape, random weights", list(range(1, 21)), 32, (1, 8), args)


def nelbo_and_batching(model: BD3LM, args) -> None:
    """Parts 1 and 2."""
    cfg = model.config
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


def passes_per_token(model: BD3LM, name: str, prompt: list[int], n_new: int, batches, args) -> None:
    """First-hitting (temperature 1, top-p 0.9, EOS ignored): forward passes of every kind per generated
    token, and generated tokens per second of wall time and of this process's CPU time (best of
    `args.repeats`; on a shared machine the CPU time is the steadier measure of the work done)."""
    sampler = SamplerConfig(algorithm="first_hitting", max_new_tokens=n_new, top_p=0.9, stop_at_eos=False)
    work = count_positions(model)
    for batch in batches:
        wall = 0.0
        cpu = 0.0
        passes = 0
        work.update(backbone=0, output=0)
        for _ in range(args.repeats):
            sync(args.device)
            start = time.perf_counter()
            start_cpu = time.process_time()
            out = generate(model, [prompt] * batch, sampler, seeded_generators(range(batch)))
            sync(args.device)
            tokens = sum(len(g.tokens) for g in out.generations)
            wall = max(wall, tokens / (time.perf_counter() - start))
            cpu = max(cpu, tokens / (time.process_time() - start_cpu))
            passes = out.forward_passes
        per_token = {k: v / (args.repeats * batch * n_new) for k, v in work.items()}
        print(f"{name}, first_hitting L'={model.config.block_size}, {n_new} new tokens, batch {batch:2d}: "
              f"{passes / n_new:5.3f} passes/token ({passes} passes)   positions/token: backbone "
              f"{per_token['backbone']:5.2f}, output layer {per_token['output']:5.2f}   {wall:8.1f} tok/s   "
              f"{cpu:8.1f} tok/CPU-s")


def count_positions(model: BD3LM) -> dict[str, int]:
    """Token positions that go through the backbone's first layer and through the output layer (the
    vocabulary projection), counted by forward hooks: the arithmetic of a run, free of timing noise."""
    counts = {"backbone": 0, "output": 0}

    def hook(key):
        def count(module, inputs, output):
            counts[key] += inputs[0].numel() // inputs[0].shape[-1]
        return count

    model.backbone.blocks[0].register_forward_hook(hook("backbone"))
    model.backbone.output_layer.linear.register_forward_hook(hook("output"))
    return counts


if __name__ == "__main__":
    main()
