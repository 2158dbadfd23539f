"""Command-line flags of `bench_vllm.py`, checked once: a bad flag or value ends the run with one line."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

PARTS = ("copy", "grammar", "released")
_BLOCK_SIZES = {"grammar": (1, 4, 16), "released": (4, 8, 16)}  # bundled grammar checkpoints; released L'
_GRAMMAR_PROMPT_MAX = 6  # tokens of the longest grammar prompt; its new tokens must fit after it


@dataclass(frozen=True)
class BenchArgs:
    only: str | None
    concurrency: tuple[int, ...]
    released_concurrency: tuple[int, ...]
    requests: int  # copy items and grammar requests
    tokens: int  # grammar: new tokens per request
    repeats: int
    threshold: float | None  # copy: fixed threshold instead of the sweep
    sweep: tuple[float, ...]
    sweep_items: int
    grammar_block_size: int
    released_block_size: int
    released_waves: int
    released_tokens: int
    threads: int  # torch threads for both models

    def __post_init__(self) -> None:
        for name in ("requests", "tokens", "repeats", "sweep_items", "released_waves", "released_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        for name in ("concurrency", "released_concurrency"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must list positive integers, got {getattr(self, name)}")
        for th in self.sweep + ((self.threshold,) if self.threshold is not None else ()):
            if not 0.0 < th <= 1.0:
                raise ValueError(f"thresholds must lie in (0, 1], got {th}")
        if self.sweep_items > 200 or (self.only in (None, "copy") and self.requests > 200):
            raise ValueError("the copy task has 200 held-out items: --requests and --sweep-items must be ≤ 200")
        if self.tokens + _GRAMMAR_PROMPT_MAX > 128 or self.released_tokens + _GRAMMAR_PROMPT_MAX > 128:
            raise ValueError(f"--tokens and --released-tokens must be ≤ {128 - _GRAMMAR_PROMPT_MAX} "
                             "(max_model_len 128 holds prompt and new tokens)")
        for part, sizes in _BLOCK_SIZES.items():
            if getattr(self, f"{part}_block_size") not in sizes:
                raise ValueError(f"--{part}-block-size must be one of {', '.join(map(str, sizes))}")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.exit(f"bench_vllm.py: {message}")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv: list[str]) -> BenchArgs:
    ap = _OneLineParser(prog="bench_vllm.py", description="BD3 against AR in one vLLM (see the module docstring)")
    ap.add_argument("--only", choices=PARTS, help="run one part (default: all three)")
    ap.add_argument("--concurrency", type=_ints, default=(1, 4, 16), help="copy and grammar (default 1,4,16)")
    ap.add_argument("--released-concurrency", type=_ints, default=(1, 16))
    ap.add_argument("--requests", type=int, default=32, help="copy items and grammar requests (default 32)")
    ap.add_argument("--tokens", type=int, default=64, help="grammar: new tokens per request (default 64)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds per concurrency level, fastest kept")
    ap.add_argument("--threshold", type=float, help="copy: use this threshold instead of the sweep")
    ap.add_argument("--sweep", type=_floats, default=(0.5, 0.9, 0.99), help="copy: thresholds to try")
    ap.add_argument("--sweep-items", type=int, default=32, help="copy: held-out items per swept threshold")
    ap.add_argument("--grammar-block-size", type=int, default=4)
    ap.add_argument("--released-block-size", type=int, default=4)
    ap.add_argument("--released-waves", type=int, default=2, help="released: waves of requests per level (default 2)")
    ap.add_argument("--released-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both models (default 1: with two, a busy machine stalls every pass)")
    try:
        return BenchArgs(**vars(ap.parse_args(argv)))
    except ValueError as err:
        sys.exit(f"bench_vllm.py: {err}")
