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


def draw_tokens(probs: torch.Tensor, generator: torch.Generator, greedy: bool) -> torch.Tensor:
    """One token per row of probs (n, V): argmax(p / E) with E ~ Exp(1) in float64, or argmax(p)."""
    if greedy:
        return probs.argmax(dim=-1)
    u = torch.rand(probs.shape, generator=generator, dtype=torch.float64).to(probs.device)
    noise = 1e-10 - torch.log(u + 1e-10)
    return (probs / noise).argmax(dim=-1)


def first_hitting_step(logits: torch.Tensor, masked: torch.Tensor, generators: list[torch.Generator], *,
                       mask_id: int, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reveal exactly one masked position per row, chosen uniformly (Zheng et al.'s first-hitting time
    for α_t = 1 − t: the next event reveals one token and which one is uniform).

    logits (B, L', V), masked (B, L') -> reveal (B, L') bool, tokens (B, L').
    """
    reveal = torch.zeros_like(masked)
    tokens = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    for row, gen in enumerate(generators):
        candidates = masked[row].nonzero().flatten()
        if candidates.numel() == 0:
            continue
        pos = candidates[torch.randint(candidates.numel(), (1,), generator=gen).item()]
        probs = token_probs(logits[row, pos][None], mask_id, temperature, top_p)
        tokens[row, pos] = draw_tokens(probs, gen, temperature == 0)[0]
        reveal[row, pos] = True
    return reveal, tokens


def ddpm_step(logits: torch.Tensor, masked: torch.Tensor, generators: list[torch.Generator], *, t: float,
              s: float, mask_id: int, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior step from t to s < t: a masked token stays masked with probability s/t, else it takes a
    token from p_θ(x_0). At s = 0 every masked token is revealed."""
    reveal = torch.zeros_like(masked)
    tokens = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    p_reveal = 1.0 if s <= 0 else (t - s) / t
    for row, gen in enumerate(generators):
        candidates = masked[row].nonzero().flatten()
        if candidates.numel() == 0:
            continue
        u = torch.rand(candidates.numel(), generator=gen, dtype=torch.float64)
        chosen = candidates[(u < p_reveal).to(candidates.device)]
        if chosen.numel() == 0:
            continue
        probs = token_probs(logits[row, chosen], mask_id, temperature, top_p)
        tokens[row, chosen] = draw_tokens(probs, gen, temperature == 0)
        reveal[row, chosen] = True
    return reveal, tokens


def threshold_step(logits: torch.Tensor, masked: torch.Tensor, generators: list[torch.Generator], *,
                   threshold: float, mask_id: int, temperature: float, top_p: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence-threshold parallel decoding: propose a token at every masked position and reveal those
    whose probability is ≥ threshold; when none is, reveal the single most confident one."""
    reveal = torch.zeros_like(masked)
    tokens = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    for row, gen in enumerate(generators):
        candidates = masked[row].nonzero().flatten()
        if candidates.numel() == 0:
            continue
        probs = token_probs(logits[row, candidates], mask_id, temperature, top_p)  # (n, V)
        proposal = draw_tokens(probs, gen, temperature == 0)
        confidence = probs.gather(-1, proposal[:, None]).squeeze(-1)
        sure = confidence >= threshold
        if not sure.any():
            # One position: the most confident, the leftmost among ties. Ties are judged with a tolerance,
            # since positions that are equal in exact arithmetic (an all-mask block with no context) differ
            # in the last bits between batch layouts, and the choice must not depend on the batch.
            sure = confidence >= confidence.max() - _TIE
            sure &= sure.cumsum(0) == 1
        tokens[row, candidates[sure]] = proposal[sure]
        reveal[row, candidates[sure]] = True
    return reveal, tokens
