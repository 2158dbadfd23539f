"""Where a BD3 block step's time goes in vLLM at concurrency 1: cProfile over an in-process engine
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), requests one at a time, the time of each part per model pass.

    python bench/profile_runner.py [--block-size 4] [--tokens 64] [--requests 8] [--algorithm first_hitting] [--top N]

Parts are functions' cumulative times (a part called inside another counts in both); "model" is the
backbone over the tokens, "output layer" `compute_logits`, "metadata" the runner's and the attention
backend's metadata building, "sampler" the step functions of `bd3_plugin.sampling.samplers`.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# (label, file suffix, function name): the parts reported
PARTS = [
    ("engine step (all)", "v1/engine/core.py", "step"),
    ("scheduler: schedule", "vllm_backend/worker/engine.py", "schedule"),
    ("scheduler: update_from_output", "sched/scheduler.py", "update_from_output"),
    ("runner: execute_model", "vllm_backend/worker/runner.py", "execute_model"),
    ("runner: _update_states", "vllm_backend/worker/runner.py", "_update_states"),
    ("runner: _prepare_inputs (vLLM)", "gpu_model_runner.py", "_prepare_inputs"),
    ("runner: attention metadata (vLLM)", "gpu_model_runner.py", "_build_attention_metadata"),
    ("metadata: split_into_blocks", "", "split_into_blocks"),
    ("metadata: take_blocks", "vllm_backend/worker/block_metadata.py", "take_blocks"),
    ("metadata: CPU attention build", "backends/cpu_attn.py", "build"),
    ("runner: _model_forward", "vllm_backend/worker/runner.py", "_model_forward"),
    ("model (backbone)", "vllm_backend/worker/model.py", "forward"),
    ("output layer", "vllm_backend/worker/model.py", "compute_logits"),
    ("sampler: denoise_block", "bd3_plugin/sampling/denoise.py", "denoise_block"),
    ("sampler: step functions", "bd3_plugin/sampling/samplers.py", "first_hitting_step"),
    ("sampler: step functions", "bd3_plugin/sampling/samplers.py", "threshold_step"),
    ("sampler: step functions", "bd3_plugin/sampling/samplers.py", "ddpm_step"),
    ("runner: sample_tokens (vLLM)", "gpu_model_runner.py", "sample_tokens"),
    ("runner: bookkeeping (vLLM)", "gpu_model_runner.py", "_bookkeeping_sync"),
    ("output processing (vLLM)", "v1/engine/output_processor.py", "process_outputs"),
]


def part_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds per part label (summed over the functions a label names)."""
    out = {label: 0.0 for label, *_ in PARTS}
    for (path, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        for label, suffix, fn in PARTS:
            if name == fn and suffix in path.replace(os.sep, "/"):
                out[label] += cumulative
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--algorithm", default="first_hitting")
    ap.add_argument("--top", type=int, default=0, help="also list the N functions with the most own time")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from bd3_plugin.core.checkpoint import load_checkpoint
    from bd3_plugin.tinyworld.data import checkpoint_path, read_heldout, stream_ids

    ckpt = load_checkpoint(checkpoint_path(args.block_size))
    ids = stream_ids([doc.text.split() for doc in read_heldout()[:20]], ckpt.tokenizer)
    prompts = [TokensPrompt(prompt_token_ids=ids[9 * i : 9 * i + 10]) for i in range(args.requests)]
    llm = LLM(str(checkpoint_path(args.block_size)), dtype="float32", max_model_len=128, seed=0)
    params = SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True, seed=0,
                            extra_args={"algorithm": args.algorithm})
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    passes0 = llm.collective_rpc("bd3_forward_passes")[0]
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    made = sum(len(llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts)
    profiler.disable()
    seconds = time.perf_counter() - start
    passes = llm.collective_rpc("bd3_forward_passes")[0] - passes0
    print(f"# {platform.machine()}, {os.cpu_count()} cores; tiny-bd3-L{args.block_size}, {args.algorithm}, "
          f"concurrency 1, {args.requests} requests x {args.tokens} new tokens (under cProfile)")
    print(f"{made} tokens, {passes} model passes ({passes / made:.2f} per token), {seconds:.2f} s, "
          f"{1e3 * seconds / passes:.2f} ms per pass")
    stats = pstats.Stats(profiler)
    for label, sec in part_seconds(stats).items():
        print(f"  {label:<36} {1e3 * sec / passes:7.3f} ms/pass  {100 * sec / seconds:5.1f}%")
    if args.top:
        print(f"the {args.top} functions with the most own time:")
        own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.top]
        for (path, line, name), (_, calls, tottime, *_rest) in own:
            where = "/".join(path.split(os.sep)[-2:])
            print(f"  {1e3 * tottime / passes:7.3f} ms/pass  {calls / passes:6.1f} calls/pass  {where}:{line} {name}")


if __name__ == "__main__":
    main()
