"""Side-by-side timings of rollouts with and without the trajectory record, and of scoring them.

1. Core `generate` at batch 16, record off against record on (generated tokens per second of process CPU
   time, per sampler, and wall-clock for reference); the runs alternate so that both see the same machine
   load. With one thread, CPU time is what the process itself spent, which other jobs on a shared machine
   disturb far less than wall-clock time.
2. `score_trajectory` on the recorded rollouts: forward passes and time per rollout.

    python bench/bench_rollouts.py [--threads N] [--repeats R]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from bd3_plugin.generate import SamplerConfig, generate
from bd3_plugin.noise import seeded_generators
from bench_model import bench_model
from bd3_plugin.trajectory_scoring import score_trajectory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = bench_model()
    cfg = model.config
    print(f"# machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"# model: {cfg.n_blocks} layers × {cfg.hidden_dim}, vocab {cfg.vocab_size}, L={cfg.model_length}, "
          f"L'={cfg.block_size}; batch {args.batch}, prompt 20 tokens, 64 new tokens, best of {args.repeats}")
    prompts = [list(range(1, 21))] * args.batch

    for algorithm in ("first_hitting", "ddpm", "threshold"):
        sampler = SamplerConfig(algorithm=algorithm, max_new_tokens=64, top_p=0.9, threshold=0.5)

        def run(record: bool) -> tuple[float, float, object]:
            wall, cpu = time.perf_counter(), time.process_time()
            out = generate(model, prompts, sampler, seeded_generators(range(args.batch)), record=record)
            tokens = sum(len(g.tokens) for g in out.generations)
            return tokens / (time.process_time() - cpu), tokens / (time.perf_counter() - wall), out

        run(False), run(True)  # warm-up
        off, on = [], []
        for _ in range(args.repeats):  # alternate, so that both see the same load
            off.append(run(False)[:2])
            on.append(run(True)[:2])
        out = run(True)[2]
        cpu_off, cpu_on = max(o[0] for o in off), max(o[0] for o in on)
        wall_off, wall_on = max(o[1] for o in off), max(o[1] for o in on)
        print(f"generate {algorithm:13s}: record off {cpu_off:7.1f} tok/s   record on {cpu_on:7.1f} tok/s   "
              f"on/off {cpu_on / cpu_off:5.3f}   (wall-clock: {wall_off:7.1f} vs {wall_on:7.1f}, "
              f"{wall_on / wall_off:5.3f})")
        start, cpu = time.perf_counter(), time.process_time()
        calls = []
        forward = model.forward_train

        def counted(*a, **k):
            calls.append(1)
            return forward(*a, **k)

        model.forward_train = counted
        scores = score_trajectory(model, out.trajectories)
        sum(s.logprob.sum() for s in scores).backward()
        model.forward_train = forward
        model.zero_grad()
        took, took_cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"score_trajectory {algorithm:13s}: {len(calls)} passes of 2×{len(out.trajectories[0].sequence())} "
              f"tokens for {args.batch} rollouts, {took_cpu / args.batch * 1e3:6.1f} ms CPU per rollout with "
              f"backward (wall-clock {took / args.batch * 1e3:6.1f} ms)")


if __name__ == "__main__":
    main()
