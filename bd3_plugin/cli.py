"""`bd3`: inspect a checkpoint, compute its NELBO on a text, sample from it, measure its generative perplexity.

Every user error ends in one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .config import ConfigError
from .generate import ALGORITHMS
from .genppl_cli import add_genppl_parser, cmd_genppl
from .rl_cli import add_rl_parser, cmd_rl


class UsageError(ValueError):
    pass


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint folder or Hugging Face hub id (default: the bundled tiny-bd3-L4)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bd3", description="Block Diffusion language models (BD3-LMs)")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show a checkpoint's configuration")
    _add_checkpoint(info)
    info.add_argument("--json", action="store_true")

    nelbo = sub.add_parser("nelbo", help="NELBO (an upper bound on the NLL) of a text")
    _add_checkpoint(nelbo)
    nelbo.add_argument("--text-file", type=Path,
                       help="text to score (default: the bundled held-out documents of the synthetic language, "
                            "reported next to their exact NLL)")
    nelbo.add_argument("--lines", action="store_true", help="each non-empty line is a document ending in EOS")
    nelbo.add_argument("--estimator", default=None,
                       help="auto (default), exact, stratified or mc: how the bound's expectation is computed")
    nelbo.add_argument("--passes", type=int, default=None, help="the most 2L passes per window (default 16)")
    nelbo.add_argument("--mc-samples", type=int, default=None,
                       help="Monte Carlo samples of t: the same as --estimator mc --passes K, with a standard error")
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
    sample.add_argument("--top-k", type=int, default=0, help="keep the k most probable tokens (0: all)")
    sample.add_argument("--steps", type=int, default=None, help="DDPM steps per block")
    sample.add_argument("--threshold", type=float, default=0.9, help="threshold sampler confidence")
    sample.add_argument("--num-samples", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--json", action="store_true")
    world = sub.add_parser("world", help="the tiny world's table: bounds per block size against the exact "
                                         "entropy, and sample validity")
    world.add_argument("--mc-samples", type=int, default=4)
    world.add_argument("--samples", type=int, default=64, help="sampled documents per checkpoint and sampler")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--threshold", type=float, default=0.9, help="threshold sampler confidence (copy task)")
    world.add_argument("--copy-items", type=int, default=200, help="held-out copy items per checkpoint")
    world.add_argument("--json", action="store_true")
    serve = sub.add_parser("serve", help="serve a checkpoint with vLLM's OpenAI-compatible server",
                           allow_abbrev=False, usage="bd3 serve [CHECKPOINT] [--host H] [--port N] [--max-model-len M] "
                                 "[vllm serve arguments] [-- vllm serve arguments]")
    serve.add_argument("checkpoint", nargs="?", default=None, help="checkpoint folder (default: tiny-bd3-L4)")
    serve.add_argument("--host", default=None, help="default: 127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: 8000")
    serve.add_argument("--max-model-len", type=int, default=None, help="default: the model length")
    add_train_parser(sub)
    add_genppl_parser(sub)
    add_rl_parser(sub)
    return parser


def add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a BD3-LM on the synthetic language or a text file")
    train.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    train.add_argument("--block-size", required=True, type=int)
    train.add_argument("--data", default="synthetic", help="'synthetic' or a text file")
    train.add_argument("--tokenizer", type=Path, help="tokenizer folder (for a text file)")
    train.add_argument("--source", default="grammar", choices=("grammar", "copy"),
                       help="synthetic source (with --data synthetic): the grammar or the copy task")
    train.add_argument("--n-docs", type=int, default=30000, help="synthetic training documents")
    for name, default in (("model-length", 128), ("hidden-dim", 128), ("n-heads", 4), ("n-blocks", 4),
                          ("cond-dim", 64), ("steps", 1200), ("batch-size", 32), ("warmup", 100),
                          ("seed", 0), ("save-every", 200)):
        train.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("lr", 1e-3), ("ema", 0.999), ("eps-min", 1e-3), ("eps-max", 1.0)):
        train.add_argument(f"--{name}", type=float, default=default)
    train.add_argument("--resample", action="store_true", help="resample blocks outside [eps-min, eps-max]")
    train.add_argument("--resume", action="store_true", help="continue from the folder's trainer state")
    train.add_argument("--init-from", default=None,
                       help="start from this checkpoint's weights (same architecture; any block size)")
    train.add_argument("--device", default="cpu")


def _checkpoint_arg(args) -> str:
    if args.checkpoint is not None:
        return args.checkpoint
    from .tinyworld.data import checkpoint_path

    return str(checkpoint_path())


def _load(args):
    import torch

    from .checkpoint import load_checkpoint

    return load_checkpoint(_checkpoint_arg(args), device=args.device, dtype=getattr(torch, args.dtype))


def cmd_info(args) -> dict:
    from .checkpoint import read_config, resolve

    folder = resolve(_checkpoint_arg(args))
    cfg = read_config(folder)
    files = sorted(p.name for p in folder.iterdir())
    info = {"path": str(folder), **cfg.to_dict(), "mask_id": cfg.mask_id, "head_dim": cfg.head_dim, "files": files}
    if not args.json:
        for k, v in info.items():
            print(f"{k:18s} {v}")
    return info


def cmd_nelbo(args) -> dict:
    from .estimators import check_fits, resolve
    from .scoring import eval_interval, report, score_documents
    from .tinyworld.data import HELDOUT, read_heldout, true_nll_per_token

    estimator = resolve(args.estimator, args.passes, args.mc_samples)
    truth = None
    if args.text_file is None:
        heldout = read_heldout(HELDOUT)
        texts, lines, truth = [d.text for d in heldout], True, true_nll_per_token(heldout)
    else:
        if not args.text_file.is_file():
            raise UsageError(f"no such text file: {args.text_file}")
        text = args.text_file.read_text()
        texts, lines = ([t for t in text.splitlines() if t.strip()] if args.lines else [text]), args.lines
        if not "".join(texts).strip():
            raise UsageError(f"{args.text_file} is empty")
    ckpt = _load(args)
    check_fits(estimator, ckpt.model.config.block_size, *eval_interval(ckpt.model))
    eos = [ckpt.eos_id] if lines and ckpt.eos_id is not None else []
    docs = [ckpt.encode(t) + eos for t in texts]
    per_doc = score_documents(ckpt.model, docs, bos_id=ckpt.tokenizer.bos_token_id, estimator=estimator,
                              seed=args.seed, batch_size=args.batch_size, progress=not args.json)
    rep = report(per_doc, sum(len(d) for d in docs), estimator)
    out = rep.as_dict() | {"documents": len(docs), "block_size": ckpt.config.block_size}
    if truth is not None:
        out |= {"true_nll_per_token": truth, "true_ppl": math.exp(truth)}
    if not args.json:
        err = f" ± {rep.mc_stderr:.4f}" if rep.mc_stderr is not None else ""
        how = (f"{rep.mc_samples} MC sample(s)" if estimator.name == "mc"
               else f"estimator {estimator.name}, ≤ {estimator.passes} passes")
        print(f"{len(docs)} documents, {rep.tokens} tokens  NLL bound {rep.nll_per_token:.4f}{err} nats/token  "
              f"perplexity ≤ {rep.ppl_bound:.3f}  ({how}, L'={ckpt.config.block_size})")
        if truth is not None:
            print(f"exact NLL of the source {truth:.4f} nats/token  perplexity {math.exp(truth):.3f}")
    return out


def cmd_sample(args) -> dict:
    from .generate import SamplerConfig, generate
    from .noise import seeded_generators

    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    sampler = SamplerConfig(algorithm=args.algorithm, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, steps=args.steps,
                            threshold=args.threshold)
    ckpt = _load(args)
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


def cmd_train(args) -> dict:
    from .train import TrainConfig, Trainer, training_data

    tc = TrainConfig(block_size=args.block_size, model_length=args.model_length, hidden_dim=args.hidden_dim,
                     n_heads=args.n_heads, n_blocks=args.n_blocks, cond_dim=args.cond_dim, steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema=args.ema,
                     eps_min=args.eps_min, eps_max=args.eps_max, resample=args.resample, seed=args.seed,
                     save_every=args.save_every, init_from=args.init_from)
    rows, tokenizer = training_data(args.data, args.tokenizer, tc.model_length, args.n_docs, args.source)
    tc.model_config(len(tokenizer), tokenizer.mask_token_id)  # validates the shapes before any work
    if (args.out / "trainer_state.pt").exists() and not args.resume:
        raise UsageError(f"{args.out} holds a training run; pass --resume to continue it")
    trainer = Trainer(tc, rows, len(tokenizer), tokenizer.mask_token_id, args.out, tokenizer, args.device)
    resumed = args.resume and trainer.resume()
    start = time.perf_counter()
    losses = trainer.run(progress=True)
    tail = losses[-50:]
    out = {"out": str(args.out), "steps": trainer.step, "resumed": bool(resumed), "rows": rows.shape[0],
           "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - start}
    print(f"saved {args.out} after {trainer.step} steps, loss {out['final_loss']:.4f}")
    return out


def parse_serve(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`bd3 serve` arguments: bd3's own options anywhere before `--`; every other argument, and everything
    after `--`, goes to `vllm serve` unchanged, in order, once."""
    cut = argv.index("--") if "--" in argv else len(argv)
    args, unknown = parser.parse_known_args(argv[:cut])
    args.vllm_args = unknown + argv[cut + 1 :]
    return args


def cmd_serve(args) -> dict:
    from .checkpoint import resolve

    checkpoint = str(resolve(_checkpoint_arg(args)))
    extra = args.vllm_args
    try:
        from vllm_backend.serve import exec_server
    except ImportError as err:
        raise UsageError(f"vLLM is not installed ({err}); install bd3-plugin[cpu] or bd3-plugin[gpu]") from None
    exec_server(checkpoint, args.host, args.port, args.max_model_len, extra)
    return {}


def cmd_world(args) -> dict:
    from .tinyworld.data import HELDOUT, bundled_checkpoints, read_heldout
    from .tinyworld.report import (as_dicts, copy_dicts, copy_markdown, copy_rows, heldout_answer_entropy, markdown,
                                   world_rows)

    if args.mc_samples < 1 or args.samples < 1 or args.copy_items < 1:
        raise UsageError("--mc-samples, --samples and --copy-items must be >= 1")
    if not 0 < args.threshold <= 1:
        raise UsageError(f"--threshold must lie in (0, 1], got {args.threshold}")
    if not bundled_checkpoints():
        raise UsageError("no bundled checkpoints found; run scripts/build_tiny_world.sh")
    rows = world_rows(mc_samples=args.mc_samples, n_samples=args.samples, seed=args.seed, progress=not args.json)
    copy = copy_rows(threshold=args.threshold, mc_samples=args.mc_samples, seed=args.seed, n_items=args.copy_items)
    entropy = heldout_answer_entropy(args.copy_items)
    if not args.json:
        print(markdown(rows, args.mc_samples, args.samples, len(read_heldout(HELDOUT))))
        if copy:
            print()
            print(copy_markdown(copy, args.threshold, args.mc_samples, entropy))
    return {"rows": as_dicts(rows), "copy": {"answer_entropy": entropy, "threshold": args.threshold,
                                             "rows": copy_dicts(copy)}}


COMMANDS = {"info": cmd_info, "nelbo": cmd_nelbo, "sample": cmd_sample, "train": cmd_train, "world": cmd_world,
            "serve": cmd_serve, "genppl": cmd_genppl, "rl": cmd_rl}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parse_serve(parser, argv) if argv[:1] == ["serve"] else parser.parse_args(argv)
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
