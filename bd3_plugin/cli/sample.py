"""`bd3 sample`: a continuation of a prompt from the block sampler."""
from __future__ import annotations

import time

from bd3_plugin.cli.common import UsageError, add_checkpoint, load, subparser, user_input
from bd3_plugin.sampling.registry import sampler_names


def add_parser(sub) -> None:
    p = subparser(sub, "sample", help="generate a continuation of a prompt")
    add_checkpoint(p)
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--algorithm", choices=sampler_names(), default="first_hitting", help="sampler")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy and deterministic")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most probable tokens (0: all)")
    p.add_argument("--steps", type=int, default=None, help="DDPM steps per block (default: the block size)")
    p.add_argument("--threshold", type=float, default=0.9, help="threshold sampler confidence")
    p.add_argument("--num-samples", type=int, default=1, help="samples, seeds seed, seed+1, …")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> dict:
    from bd3_plugin.sampling.config import SamplerConfig
    from bd3_plugin.sampling.generate import generate
    from bd3_plugin.core.generators import seeded_generators

    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    with user_input():
        sampler = SamplerConfig(algorithm=args.algorithm, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, steps=args.steps,
                                threshold=args.threshold)
    ckpt = load(args)
    prompt = ckpt.encode(args.prompt)
    start = time.perf_counter()
    result = generate(ckpt.model, [prompt] * args.num_samples, sampler,
                      seeded_generators([args.seed + i for i in range(args.num_samples)]), eos_id=ckpt.eos_id)
    seconds = time.perf_counter() - start
    samples = [{"text": ckpt.decode(g.tokens), "full_text": ckpt.decode(prompt + g.tokens), "tokens": g.tokens,
                "finish_reason": g.finish_reason,
                "reveal_steps": g.reveal_steps, "denoise_steps": g.denoise_steps} for g in result.generations]
    out = {"prompt": args.prompt, "samples": samples, "forward_passes": result.forward_passes,
           "denoise_passes": result.denoise_passes, "commit_passes": result.commit_passes, "seconds": seconds}
    if not args.json:
        for s in samples:
            print(s["full_text"])
            print(f"[{len(s['tokens'])} tokens, {s['finish_reason']}]")
        print(f"[{result.forward_passes} forward passes ({result.denoise_passes} denoise, "
              f"{result.commit_passes} commit), {seconds:.2f} s]")
    return out
