"""The SUBS parameterisation (spec §3.1): the model never predicts the mask, and observed tokens are carried over."""
from __future__ import annotations

import torch

NEG_INF = -1e6  # the reference's "minus infinity" for log-probs; finite so 0 · NEG_INF stays 0


def subs_logits(logits: torch.Tensor, mask_id: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A copy of `logits` (…, V) in `dtype` whose mask logit is lowered by NEG_INF: no softmax, argmax or
    filter over it ever gives the mask. Every SUBS distribution starts here."""
    logits = logits.to(dtype, copy=True)
    logits[..., mask_id] += NEG_INF
    return logits


def subs_log_softmax(logits: torch.Tensor, mask_id: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log p_θ(x_0) with SUBS at every position, (…, V) in `dtype`: the mask is never predicted."""
    return torch.log_softmax(subs_logits(logits, mask_id, dtype), dim=-1)


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: never predict the mask; observed tokens are carried over with log-prob 0.

    logits (B, T, V) -> log-probs (B, T, V) in fp32.
    """
    logp = subs_log_softmax(logits, mask_id, torch.float32)
    observed = x_t != mask_id  # (B, T)
    carry = torch.full_like(logp, NEG_INF).scatter_(-1, x_t[..., None], 0.0)
    return torch.where(observed[..., None], carry, logp)
