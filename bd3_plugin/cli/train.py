"""`bd3 train`: train a BD3-LM on the tiny world's sources or a text file (the trainer: training/trainer.py).

    bd3 train --out runs/bd3-L4 --block-size 4 [--steps N] [--data synthetic|FILE --tokenizer DIR]
              [--source grammar|copy] [--init-from CKPT]
"""
from __future__ import annotations

import time
from pathlib import Path

from bd3_plugin.cli.common import UsageError, subparser, user_input
from bd3_plugin.tinyworld.data import SOURCES, training_stream
from bd3_plugin.tinyworld.grammar import build_tokenizer
from bd3_plugin.training.trainer import TrainConfig, Trainer, rows_from_stream


def add_parser(sub) -> None:
    p = subparser(sub, "train", help="train a BD3-LM on the synthetic language or a text file")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--block-size", required=True, type=int, help="the block size L'")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a text file")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder, required with a text file (default: none)")
    p.add_argument("--source", default="grammar", choices=SOURCES,
                   help="synthetic source (with --data synthetic): the grammar or the copy task")
    p.add_argument("--n-docs", type=int, default=30000, help="synthetic training documents")
    d = TrainConfig(block_size=1)
    helps = {"model_length": "tokens per training row (the model length L)", "hidden_dim": "model width",
             "n_heads": "attention heads", "n_blocks": "transformer blocks", "cond_dim": "noise-level embedding width",
             "steps": "optimiser steps", "batch_size": "rows per step", "warmup": "linear warm-up steps",
             "seed": "seed of the weights and the noise", "save_every": "steps between saved trainer states",
             "lr": "AdamW learning rate", "ema": "EMA decay of the saved weights",
             "eps_min": "lower end of the training noise interval", "eps_max": "upper end of the training noise interval"}
    for name, text in helps.items():
        default = getattr(d, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=text)
    p.add_argument("--resample", action="store_true", help="resample blocks outside [eps-min, eps-max]")
    p.add_argument("--resume", action="store_true", help="continue from the folder's trainer state")
    p.add_argument("--init-from", default=None,
                   help="start from this checkpoint's weights (same architecture; any block size; default: none)")
    p.add_argument("--device", default="cpu", help="torch device")


def training_data(data: str, tokenizer_dir: Path | None, length: int, n_docs: int, source: str = "grammar"):
    """Rows (R, length) and the tokenizer: a synthetic source's corpus (the grammar or the copy task, both
    over the grammar's tokenizer), or a text file with its tokenizer."""
    if source not in SOURCES:
        raise UsageError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    if data == "synthetic":
        tokenizer = build_tokenizer()
        return rows_from_stream(training_stream(source, n_docs, tokenizer), length), tokenizer
    if source != "grammar":
        raise UsageError(f"--source {source} applies to --data synthetic only")
    path = Path(data)
    if not path.is_file():
        raise UsageError(f"--data must be 'synthetic' or a text file; {path} does not exist")
    if tokenizer_dir is None:
        raise UsageError("--tokenizer is required with a text file")
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    if tokenizer.mask_token_id is None:
        raise UsageError(f"the tokenizer in {tokenizer_dir} has no mask token")
    return rows_from_stream(tokenizer.encode(path.read_text(), add_special_tokens=False), length), tokenizer


def run(args) -> dict:
    with user_input():
        tc = TrainConfig(block_size=args.block_size, model_length=args.model_length, hidden_dim=args.hidden_dim,
                         n_heads=args.n_heads, n_blocks=args.n_blocks, cond_dim=args.cond_dim, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema=args.ema,
                         eps_min=args.eps_min, eps_max=args.eps_max, resample=args.resample, seed=args.seed,
                         save_every=args.save_every, init_from=args.init_from)
    rows, tokenizer = training_data(args.data, args.tokenizer, tc.model_length, args.n_docs, args.source)
    with user_input():
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
