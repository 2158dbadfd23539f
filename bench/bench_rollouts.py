"""Side-by-side timings of rollouts with and without the trajectory record, and of scoring them.

1. Core `generate` at batch 16, record off against record on (generated tokens per second of process CPU
   time, per sampler, and wall-clock for reference); the runs alternate so that both see the same machine
   load. With one thread, CPU time is what the process itself spent, which other jobs on a shared machine
   disturb far less than wall-clock time.
2. `score_trajectory` on the recorded rollouts: forward passes and time per rollout.
3. The vLLM engine (in this process, the bundled tiny-world L' = 16 checkpoint), the same requests with
   traces off (`LLM.generate`), with traces on (`vllm_backend.server.traces.generate_with_trajectories`) and with
   `logprobs=5`, alternating; generated tokens per second of process CPU time.

    python bench/bench_rollouts.py [--threads N] [--repeats R] [--part core|engine|all]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from bd3_plugin.sampling.config import SamplerConfig

from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.generators import seeded_generators
from bench_model import bench_model
from bd3_plugin.rl.trajectory_scoring import score_trajectory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--part", choices=("core", "engine", "all"), default="all")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    if args.part in ("core", "all"):
        core(args)
    if args.part in ("engine", "all"):
        engine(args)


def core(args) -> None:
    model = bench_model()
    cfg = model.config
    print(f"# model: {cfg.n_blocks} layers × {cfg.hidden_dim}, vocab {cfg.vocab_size}, L={cfg.model_length}, "
          f"L'={cfg.block_size}; batch {args.batch}, prompt 20 tokens, 64 new tokens, best of {args.repeats}")
    prompts = [list(range(1, 21))] * args.batch

    for algorithm in ("first_hitting", "ddpm", "threshold"):
        sampler = SamplerConfig(algorithm=algorithm, max_new_tokens=64, top_p=0.9, threshold=0.5)

        def run(record: bool) -> tuple[float, float, object]:
            wall = time.perf_counter()
            cpu = time.process_time()
            out = generate(model, prompts, sampler, seeded_generators(range(args.batch)), record=record)
            tokens = sum(len(g.tokens) for g in out.generations)
            return tokens / (time.process_time() - cpu), tokens / (time.perf_counter() - wall), out

        run(False)  # warm-up
        run(True)
        off = []
        on = []
        for _ in range(args.repeats):  # alternate, so that both see the same load
            off.append(run(False)[:2])
            on.append(run(True)[:2])
        out = run(True)[2]
        cpu_off = max(o[0] for o in off)
        cpu_on = max(o[0] for o in on)
        wall_off = max(o[1] for o in off)
        wall_on = max(o[1] for o in on)
        print(f"generate {algorithm:13s}: record off {cpu_off:7.1f} tok/s   record on {cpu_on:7.1f} tok/s   "
              f"on/off {cpu_on / cpu_off:5.3f}   (wall-clock: {wall_off:7.1f} vs {wall_on:7.1f}, "
              f"{wall_on / wall_off:5.3f})")
        start = time.perf_counter()
        cpu = time.process_time()
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
        took = time.perf_counter() - start
        took_cpu = time.process_time() - cpu
        print(f"score_trajectory {algorithm:13s}: {len(calls)} passes of 2×{len(out.trajectories[0].sequence())} "
              f"tokens for {args.batch} rollouts, {took_cpu / args.batch * 1e3:6.1f} ms CPU per rollout with "
              f"backward (wall-clock {took / args.batch * 1e3:6.1f} ms)")


def engine(args) -> None:
    """Traces off, on, and logprobs on, through vLLM's engine: the same seeded requests, alternating."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine's CPU time is this process's
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from bd3_plugin.core.checkpoint import load_checkpoint
    from bd3_plugin.tinyworld.data import checkpoint_path
    from vllm_backend.server.traces import generate_with_trajectories

    path = checkpoint_path(16)
    prompts = [load_checkpoint(path).encode("<eos> the old cow sees")] * args.batch
    llm = LLM(str(path), max_model_len=128, seed=0)
    print(f"# engine: {path.name} in process, {args.batch} requests of {len(prompts[0])} prompt tokens, "
          f"64 new tokens (ignore_eos), temperature 1, top_p 0.9, best of {args.repeats}")

    def plain(params) -> int:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    for algorithm in ("first_hitting", "ddpm", "threshold"):
        params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=64, ignore_eos=True, seed=0,
                                extra_args={"algorithm": algorithm, "threshold": 0.5})
        with_logprobs = params.clone()
        with_logprobs.logprobs = 5
        runs = {"off": lambda: plain(params), "logprobs": lambda: plain(with_logprobs),
                "traces": lambda: sum(len(t[0].output) for t in generate_with_trajectories(llm, prompts, params))}
        best = dict.fromkeys(runs, 0.0)
        for run in runs.values():  # warm-up
            run()
        for _ in range(args.repeats):  # alternate, so that all three see the same load
            for name, run in runs.items():
                cpu = time.process_time()
                tokens = run()
                best[name] = max(best[name], tokens / (time.process_time() - cpu))
        print(f"engine {algorithm:13s}: traces off {best['off']:7.1f} tok/s   traces on {best['traces']:7.1f} tok/s "
              f"  on/off {best['traces'] / best['off']:5.3f}   logprobs=5 {best['logprobs']:7.1f} tok/s "
              f"  {best['logprobs'] / best['off']:5.3f}")


if __name__ == "__main__":
    main()
