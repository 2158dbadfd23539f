"""One denoising step of each sampler, for one noisy block of a batch (spec §4).

Pure functions: logits of the block in, the positions to reveal and their tokens out. Each row draws
only from its own generator and only while it still has masks, so a row's tokens never depend on what
else is in the batch. Probabilities and Gumbel noise are float64 (the paper: fp32 noise lowers entropy).
"""
from __future__ import annotations

import torch

from .noise import NEG_INF

_TIE = 1e-6


def nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most probable tokens whose cumulative probability is ≤ top_p (the token that crosses
    top_p is excluded, unlike Hugging Face's top-p), always at least the top one; renormalise."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep_sorted = sorted_p.cumsum(dim=-1) <= top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def token_probs(logits: torch.Tensor, mask_id: int, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """p_θ(x_0) at masked positions (…, V) in float64: the mask is never predicted (SUBS).

    Temperature 0 means greedy; its probabilities are those at temperature 1 (used as confidences).
    """
    logits = logits.double().clone()
    logits[..., mask_id] += NEG_INF
    scale = temperature if temperature > 0 else 1.0
    return nucleus_filter(torch.softmax(logits / scale, dim=-1), top_p)


def _row_draws(generators: list[torch.Generator], counts: list[int], width: int | None, device) -> torch.Tensor:
    """Uniform float64 draws, `counts[r]` (× width) from row r's own generator, stacked in row order."""
    shape = (lambda n: (n,)) if width is None else (lambda n: (n, width))
    parts = [torch.rand(shape(n), generator=g, dtype=torch.float64, device=g.device) for g, n in zip(generators, counts) if n]
    if not parts:
        return torch.zeros(shape(0), dtype=torch.float64, device=device)
    return torch.cat(parts).to(device)


def draw_tokens(probs: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
    """One token per row of probs (n, V): argmax(p / E) with E = −log U ~ Exp(1) from float64 uniforms
    (n, V), or argmax(p) when `uniforms` is None (greedy)."""
    if uniforms is None:
        return probs.argmax(dim=-1)
    noise = 1e-10 - torch.log(uniforms + 1e-10)
    return (probs / noise).argmax(dim=-1)


def _propose(logits: torch.Tensor, where: torch.Tensor, generators: list[torch.Generator], mask_id: int,
             temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens drawn at the (B, L') positions `where` (row-major order) and their probabilities (n, V)."""
    probs = token_probs(logits[where], mask_id, temperature, top_p)  # (n, V)
    greedy = temperature == 0
    uniforms = None if greedy else _row_draws(generators, where.sum(1).tolist(), probs.shape[-1], probs.device)
    return draw_tokens(probs, uniforms), probs


def first_hitting_step(logits: torch.Tensor, masked: torch.Tensor, generators: list[torch.Generator], *,
                       mask_id: int, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reveal exactly one masked position per row, chosen uniformly (Zheng et al.'s first-hitting time
    for α_t = 1 − t: the next event reveals one token and which one is uniform).

    logits (B, L', V), masked (B, L') -> reveal (B, L') bool, tokens (B, L').
    """
    count = masked.sum(dim=1)  # (B,)
    live = count > 0
    u = torch.zeros(masked.shape[0], dtype=torch.float64, device=masked.device)
    u[live] = _row_draws(generators, live.long().tolist(), None, masked.device)
    k = (u * count).floor().long()  # which masked slot, 0-based
    rank = masked.long().cumsum(dim=1) - 1  # (B, L') rank of each masked slot
    reveal = masked & (rank == k[:, None])
    tokens = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    tokens[reveal] = _propose(logits, reveal, generators, mask_id, temperature, top_p)[0]
    return reveal, tokens


def ddpm_step(logits: torch.Tensor, masked: torch.Tensor, generators: list[torch.Generator], *, t: float,
              s: float, mask_id: int, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior step from t to s < t: a masked token stays masked with probability s/t, else it takes a
    token from p_θ(x_0). At s = 0 every masked token is revealed."""
    p_reveal = 1.0 if s <= 0 else (t - s) / t
    u = _row_draws(generators, masked.sum(dim=1).tolist(), None, masked.device)
    reveal = torch.zeros_like(masked)
    reveal[masked] = u < p_reveal
    tokens = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    tokens[reveal] = _propose(logits, reveal, generators, mask_id, temperature, top_p)[0]
    return reveal, tokens


def threshold_step(logits: torch.Tensor, masked: torch.Tensor, generators: list[torch.Generator], *,
                   threshold: float, mask_id: int, temperature: float, top_p: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence-threshold parallel decoding: propose a token at every masked position and reveal those
    whose probability is ≥ threshold; when none is, reveal the single most confident one."""
    proposal, probs = _propose(logits, masked, generators, mask_id, temperature, top_p)
    confidence = torch.full(masked.shape, -1.0, dtype=torch.float64, device=masked.device)
    confidence[masked] = probs.gather(-1, proposal[:, None]).squeeze(-1)
    tokens = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    tokens[masked] = proposal
    reveal = masked & (confidence >= threshold)
    stuck = masked.any(dim=1) & ~reveal.any(dim=1)
    # A stuck row reveals its most confident position, the leftmost among ties. Ties are judged with a
    # tolerance: positions equal in exact arithmetic (an all-mask block with no context) differ in the last
    # bits between batch layouts, and the choice must not depend on the batch.
    best = masked & (confidence >= confidence.max(dim=1, keepdim=True).values - _TIE)
    best &= best.long().cumsum(dim=1) == 1
    reveal |= best & stuck[:, None]
    return reveal, tokens
