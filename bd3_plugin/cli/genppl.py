"""`bd3 genppl`: the command line of generative perplexity (the protocol is genppl.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from bd3_plugin.cli.common import UsageError, add_checkpoint, load, subparser, user_input
from bd3_plugin.sampling.registry import sampler_names


def add_parser(sub) -> None:
    g = subparser(sub, "genppl", help="generative perplexity: unconditional fixed-length samples scored by a "
                                      "causal LM (the paper's protocol)")
    add_checkpoint(g)
    g.add_argument("--scorer", required=True,
                   help="causal LM (name or folder; the paper uses gpt2-large) or 'source' (the tiny world's "
                        "exact source)")
    g.add_argument("--preset", choices=("paper",), default=None,
                   help="the paper's sampler settings: first-hitting, top-p 0.9, DDPM with 5000 steps (default: none)")
    g.add_argument("--num-samples", type=int, default=300)
    g.add_argument("--length", type=int, default=None, help="tokens per sample, BOS included (default: the "
                                                            "model length)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--algorithm", choices=sampler_names(), default=None,
                   help="sampler (default: the preset's, else first_hitting)")
    g.add_argument("--temperature", type=float, default=None, help="default: the preset's, else 1.0")
    g.add_argument("--top-p", type=float, default=None, help="nucleus mass kept (default: the preset's, else 1.0)")
    g.add_argument("--steps", type=int, default=None, help="DDPM steps per block (default: the preset's, else the block size)")
    g.add_argument("--entropy-threshold", type=float, default=4.0,
                   help="reject a sample whose last --entropy-window tokens have a lower unigram entropy "
                        "(nats; 0: off)")
    g.add_argument("--entropy-window", type=int, default=256)
    g.add_argument("--max-tries", type=int, default=10)
    g.add_argument("--stride", type=int, default=None, help="scorer's sliding-window stride (default: half "
                                                            "its context)")
    g.add_argument("--scorer-device", default="cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--samples-out", type=Path, help="write each sample's text and score as JSON lines (default: not written)")
    g.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> dict:
    from bd3_plugin.evals.genppl import GenPPLConfig, generative_perplexity, make_scorer, sampler_config

    with user_input():
        sampler = sampler_config(args.preset, algorithm=args.algorithm, temperature=args.temperature,
                                 top_p=args.top_p, steps=args.steps)
    if args.samples_out is not None and not args.samples_out.parent.is_dir():
        raise UsageError(f"no such folder for --samples-out: {args.samples_out.parent}")
    ckpt = load(args)
    length = args.length if args.length is not None else ckpt.config.model_length
    with user_input():
        cfg = GenPPLConfig(length=length, num_samples=args.num_samples, batch_size=args.batch_size,
                           entropy_threshold=args.entropy_threshold, entropy_window=args.entropy_window,
                           max_tries=args.max_tries, seed=args.seed)
    if length % ckpt.config.block_size:
        raise UsageError(f"--length {length} is not a multiple of the block size {ckpt.config.block_size}")
    if args.scorer == "source" and args.stride is not None:
        raise UsageError("--stride sets a causal LM scorer's sliding window; the source scores whole streams")
    if args.scorer == "source" and not _tiny_world_tokenizer(ckpt.tokenizer):
        raise UsageError("--scorer source needs a checkpoint of the tiny world (its word-level tokenizer)")
    with user_input():
        scorer = make_scorer(args.scorer, device=args.scorer_device, stride=args.stride)  # fails before sampling
    from tqdm import tqdm

    start = time.perf_counter()
    with tqdm(total=cfg.num_samples, desc="genppl samples", disable=args.json) as bar:
        result = generative_perplexity(ckpt, scorer, sampler, cfg, progress=bar.update)
    out = {"checkpoint": str(ckpt.path), "scorer": args.scorer} | result.report
    out["seconds"] = time.perf_counter() - start
    if args.samples_out is not None:
        with args.samples_out.open("w") as f:
            for text, s, ppl, tries in zip(result.texts, result.scores, out["per_sample_ppl"], result.draws.tries):
                f.write(json.dumps({"text": text, "nll": s.nll, "tokens": s.tokens, "ppl": ppl, "tries": tries,
                                    "valid": s.valid}) + "\n")
    if not args.json:
        _print_genppl(out)
    return out


def _tiny_world_tokenizer(tokenizer) -> bool:
    from bd3_plugin.tinyworld.grammar import DEFAULT_LEXICON

    vocab = tokenizer.get_vocab()
    return all(w in vocab for w in DEFAULT_LEXICON.words())


def _print_genppl(out: dict) -> None:
    s = out["sampler"]
    print(f"{out['samples']} samples of {out['length']} tokens (L'={out['block_size']}, {s['algorithm']}, "
          f"top-p {s['top_p']}), scored by {out['scorer']}")
    print(f"gen PPL {out['gen_ppl']:.3f} (mean of per-sample PPLs)  pooled {out['pooled_ppl']:.3f}  "
          f"NLL {out['nll_per_token']:.4f} nats/token over {out['scored_tokens']} tokens (EOS excluded)")
    if "valid_fraction" in out:
        print(f"valid samples {out['valid_fraction']:.3f} (gen PPL of those {out['gen_ppl_valid']:.3f})  "
              f"valid complete documents {out['valid_documents']:.3f}")
    print(f"NFE {out['mean_nfe']:.1f} per sample  unigram entropy {out['mean_entropy']:.3f} nats  "
          f"draws {out['draws']} ({out['rejected_draws']} rejected, {out['exhausted']} kept after "
          f"{out['max_tries']} rejections)  [{out['forward_passes']} forward passes, {out['seconds']:.1f} s]")
