"""`bd3`: inspect a checkpoint, compute its NELBO on a text, sample from it.

Every user error ends in one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import ConfigError
from .generate import ALGORITHMS


class UsageError(ValueError):
    pass


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder or Hugging Face hub id")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bd3", description="Block Diffusion language models (BD3-LMs)")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show a checkpoint's configuration")
    _add_checkpoint(info)
    info.add_argument("--json", action="store_true")

    nelbo = sub.add_parser("nelbo", help="NELBO (an upper bound on the NLL) of a text file")
    _add_checkpoint(nelbo)
    nelbo.add_argument("--text-file", required=True, type=Path)
    nelbo.add_argument("--mc-samples", type=int, default=1, help="Monte Carlo samples of t (default 1)")
    nelbo.add_argument("--seed", type=int, default=0)
    nelbo.add_argument("--batch-size", type=int, default=8)
    nelbo.add_argument("--json", action="store_true")

    sample = sub.add_parser("sample", help="generate a continuation of a prompt")
    _add_checkpoint(sample)
    sample.add_argument("--prompt", default="")
    sample.add_argument("--max-new-tokens", type=int, default=64)
    sample.add_argument("--algorithm", choices=ALGORITHMS, default="first_hitting")
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--steps", type=int, default=None, help="DDPM steps per block")
    sample.add_argument("--threshold", type=float, default=0.9, help="threshold sampler confidence")
    sample.add_argument("--num-samples", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--json", action="store_true")
    return parser


def _load(args):
    import torch

    from .checkpoint import load_checkpoint

    return load_checkpoint(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))


def cmd_info(args) -> dict:
    from .checkpoint import read_config, resolve

    folder = resolve(args.checkpoint)
    cfg = read_config(folder)
    files = sorted(p.name for p in folder.iterdir())
    info = {"path": str(folder), **cfg.to_dict(), "mask_id": cfg.mask_id, "head_dim": cfg.head_dim, "files": files}
    if not args.json:
        for k, v in info.items():
            print(f"{k:18s} {v}")
    return info


def cmd_nelbo(args) -> dict:
    from .scoring import score_stream

    if not args.text_file.is_file():
        raise UsageError(f"no such text file: {args.text_file}")
    text = args.text_file.read_text()
    if not text.strip():
        raise UsageError(f"{args.text_file} is empty")
    ckpt = _load(args)
    ids = ckpt.encode(text)
    report = score_stream(ckpt.model, ids, bos_id=ckpt.tokenizer.bos_token_id, mc_samples=args.mc_samples,
                          seed=args.seed, batch_size=args.batch_size, progress=not args.json)
    out = report.as_dict()
    if not args.json:
        err = f" ± {report.mc_stderr:.4f}" if report.mc_stderr is not None else ""
        print(f"tokens {report.tokens}  NLL bound {report.nll_per_token:.4f}{err} nats/token  "
              f"perplexity ≤ {report.ppl_bound:.3f}  ({report.mc_samples} MC sample(s))")
    return out


def cmd_sample(args) -> dict:
    from .generate import SamplerConfig, generate
    from .noise import seeded_generators

    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    sampler = SamplerConfig(algorithm=args.algorithm, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, steps=args.steps,
                            threshold=args.threshold)
    ckpt = _load(args)
    prompt = ckpt.encode(args.prompt)
    start = time.perf_counter()
    result = generate(ckpt.model, [prompt] * args.num_samples, sampler,
                      seeded_generators([args.seed + i for i in range(args.num_samples)]), eos_id=ckpt.eos_id)
    seconds = time.perf_counter() - start
    samples = [{"text": ckpt.decode(g.tokens), "tokens": g.tokens, "finish_reason": g.finish_reason,
                "reveal_steps": g.reveal_steps, "denoise_steps": g.denoise_steps} for g in result.generations]
    out = {"prompt": args.prompt, "samples": samples, "forward_passes": result.forward_passes,
           "denoise_passes": result.denoise_passes, "commit_passes": result.commit_passes, "seconds": seconds}
    if not args.json:
        for s in samples:
            print(f"{args.prompt}{s['text']}")
            print(f"[{len(s['tokens'])} tokens, {s['finish_reason']}]")
        print(f"[{result.forward_passes} forward passes ({result.denoise_passes} denoise, "
              f"{result.commit_passes} commit), {seconds:.2f} s]")
    return out


COMMANDS = {"info": cmd_info, "nelbo": cmd_nelbo, "sample": cmd_sample}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        out = COMMANDS[args.command](args)
    except (UsageError, ConfigError, CheckpointError, ValueError, OSError) as err:
        print(f"bd3 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
