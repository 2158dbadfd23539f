"""The SUBS parameterisation (spec §3.1): the model never predicts the mask, and observed tokens are carried over."""
from __future__ import annotations

import torch

NEG_INF = -1e6  # the reference's "minus infinity" for log-probs; finite so 0 · NEG_INF stays 0


def subs_log_probs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: never predict the mask; observed tokens are carried over with log-prob 0.

    logits (B, T, V) -> log-probs (B, T, V) in fp32.
    """
    logits = logits.float().clone()
    logits[..., mask_id] += NEG_INF
    logp = torch.log_softmax(logits, dim=-1)
    observed = x_t != mask_id  # (B, T)
    carry = torch.full_like(logp, NEG_INF).scatter_(-1, x_t[..., None], 0.0)
    return torch.where(observed[..., None], carry, logp)
