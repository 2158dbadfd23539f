"""A sampler's settings, checked on construction: which algorithm, its temperature and filters, and when to stop."""
from __future__ import annotations

import math
from dataclasses import dataclass

from bd3_plugin.sampling.registry import ALGORITHMS, sampler_class

__all__ = ["ALGORITHMS", "SamplerConfig"]  # ALGORITHMS: the registered sampler names, a live view


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplerConfig:
    algorithm: str = "first_hitting"  # a name in the sampler registry (registry.py)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # keep the k most probable tokens before the nucleus; 0 is off
    steps: int | None = None  # DDPM: grid points per block (default: the block size)
    threshold: float = 0.9  # threshold sampler: reveal every token at least this probable
    stop_at_eos: bool = True
    entropy_stop: float | None = None  # stop a row whose last `entropy_window` tokens fall below this (nats)
    entropy_window: int = 256

    def __post_init__(self) -> None:
        sampler_class(self.algorithm)  # ValueError unless registered; looked up now, so a later one counts
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 is off), got {self.top_k!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or isinstance(self.steps, bool)
                                       or self.steps < 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not _number(self.threshold) or not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold!r}")
        if self.entropy_window < 1:
            raise ValueError(f"entropy_window must be positive, got {self.entropy_window!r}")
