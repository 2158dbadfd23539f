"""The masking process and the draw of noise levels (spec §3.1–3.2).

Log-linear schedule: a token is masked with probability t (α_t = 1 − t), and its loss weight is 1/t.
"""
from __future__ import annotations

import torch


def sample_t(n_blocks: int, samples: int, generator: torch.Generator, *, eps_min: float = 1e-3,
             eps_max: float = 1.0, antithetic: bool = True) -> torch.Tensor:
    """Noise levels (samples, n_blocks) for one sequence, uniform on [eps_min, eps_max].

    Antithetic: the samples × n_blocks draws take one stratum of [0, 1) each. The strata are dealt out by
    a random permutation, so that each block's t stays marginally uniform (fixed strata, as in the
    reference code, would give block b a biased range of t).
    """
    n = samples * n_blocks
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
    if antithetic:
        u = (u + torch.randperm(n, generator=generator, device=generator.device).double()) / n
    t = eps_min + (eps_max - eps_min) * u
    return t.view(samples, n_blocks).float()


def mask_tokens(x_0: torch.Tensor, t_tok: torch.Tensor, eligible: torch.Tensor, mask_id: int,
                generator: torch.Generator) -> torch.Tensor:
    """Mask each eligible token independently with probability t (its block's noise level)."""
    u = torch.rand(x_0.shape, generator=generator, dtype=torch.float64, device=generator.device)
    return torch.where(eligible & (u < t_tok.double()), torch.full_like(x_0, mask_id), x_0)
