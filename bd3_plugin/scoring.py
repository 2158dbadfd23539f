"""NELBO of a token stream: the bound per token and the perplexity bound, with Monte Carlo spread."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .model import BD3LM
from .nelbo import nelbo_samples
from .noise import seeded_generators


@dataclass(frozen=True)
class NelboReport:
    tokens: int  # tokens scored
    nll_per_token: float  # NELBO / tokens, nats (an upper bound on the NLL)
    ppl_bound: float  # exp(nll_per_token)
    mc_samples: int
    mc_stderr: float | None  # standard error of nll_per_token across Monte Carlo samples (K > 1)

    def as_dict(self) -> dict:
        return asdict(self)


def chunk_stream(ids: list[int], length: int, bos_id: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut a token stream into rows of `length` (the reference's wrapped evaluation).

    With a BOS id, every row starts with a clean BOS that is not scored (ignore_bos); without one the
    first token of each row is scored unconditionally. Returns ids, valid and eligible masks (R, length).
    """
    step = length - (bos_id is not None)
    rows = [ids[i : i + step] for i in range(0, len(ids), step)]
    x = torch.zeros(len(rows), length, dtype=torch.long)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    eligible = torch.zeros_like(valid)
    for r, row in enumerate(rows):
        full = ([bos_id] if bos_id is not None else []) + row
        x[r, : len(full)] = torch.tensor(full)
        valid[r, : len(full)] = True
        eligible[r, len(full) - len(row) : len(full)] = True
    return x, valid, eligible


@torch.no_grad()
def score_stream(model: BD3LM, ids: list[int], *, bos_id: int | None, mc_samples: int = 1, seed: int = 0,
                 batch_size: int = 8, progress: bool = False) -> NelboReport:
    if not ids:
        raise ValueError("nothing to score: the text has no tokens")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    x, valid, eligible = chunk_stream(ids, model.config.model_length, bos_id)
    totals = torch.zeros(mc_samples, dtype=torch.float64)
    starts = range(0, x.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="nelbo", unit="batch")
    dev = model.device
    for start in starts:
        sl = slice(start, start + batch_size)
        gens = seeded_generators([seed * 1_000_003 + r for r in range(start, start + x[sl].shape[0])])
        terms = nelbo_samples(model, x[sl].to(dev), gens, eligible=eligible[sl].to(dev), valid=valid[sl].to(dev),
                              samples=mc_samples)  # (b, K, L)
        totals += terms.double().sum(dim=(0, 2)).cpu()
    n = int(eligible.sum())
    per_sample = totals / n
    nll = float(per_sample.mean())
    stderr = float(per_sample.std() / math.sqrt(mc_samples)) if mc_samples > 1 else None
    return NelboReport(n, nll, math.exp(nll), mc_samples, stderr)
