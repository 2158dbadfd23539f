"""The block-diffusion NELBO (spec §3): an upper bound on −log p(x), one term per token.

`nelbo_terms` returns, per token, an estimate of its contribution to the bound, so that a caller can
score a continuation given a clean context (context tokens are simply not eligible for noise: they stay
clean and contribute 0). Summing the terms over a sequence gives its NELBO in nats. The estimator is
Monte Carlo over t (`nelbo_samples`) or a plan of mask subsets (`estimators.py`, `nelbo_planned`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bd3_plugin.likelihood.estimators import Estimator, row_plan
from bd3_plugin.core.model import BD3LM
from bd3_plugin.core.generators import Generators, per_row
from bd3_plugin.likelihood.noise import mask_tokens, sample_t
from bd3_plugin.core.subs import subs_log_probs


@dataclass(frozen=True)
class NoiseDraw:
    """One Monte Carlo realisation of the forward process for a batch: x_t and each token's t."""

    x_t: torch.Tensor  # (N, L) with masks
    t_tok: torch.Tensor  # (N, L) noise level of each token's block


def draw_noise(x_0: torch.Tensor, eligible: torch.Tensor, block_size: int, mask_id: int,
               generators: Generators, *, samples: int = 1, eps_min: float = 1e-3, eps_max: float = 1.0,
               antithetic: bool = True, lengths: list[int] | None = None) -> NoiseDraw:
    """Draw `samples` noisy copies of every row of x_0 (B, L) -> rows ordered (b0 s0, b0 s1, …).

    Each row uses only its own generator and draws for its own length (right padding excluded), so a
    row's draw does not depend on the rest of the batch.
    """
    b, n = x_0.shape
    lengths = [n] * b if lengths is None else lengths
    x_t = x_0.repeat_interleave(samples, dim=0).cpu()
    t_tok = torch.ones(b * samples, n, device="cpu")  # noise is drawn on the CPU generators
    for row, (gen, m) in enumerate(zip(per_row(generators, b), lengths)):
        t = sample_t(-(-m // block_size), samples, gen, eps_min=eps_min, eps_max=eps_max, antithetic=antithetic)
        rows = slice(row * samples, (row + 1) * samples)
        t_tok[rows, :m] = t.repeat_interleave(block_size, dim=1)[:, :m]  # (samples, m)
        x_t[rows, :m] = mask_tokens(x_0[row, :m].cpu().expand(samples, m), t_tok[rows, :m],
                                    eligible[row, :m].cpu().expand(samples, m), mask_id, gen)
    return NoiseDraw(x_t.to(x_0.device), t_tok.to(x_0.device))


def terms_from_logits(logits: torch.Tensor, draw: NoiseDraw, x_0: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Per-token bound contributions (N, L): (1/t)·(−log p_θ(x_0 | x_t)) where masked, else 0."""
    logp = subs_log_probs(logits, draw.x_t, mask_id).gather(-1, x_0[..., None]).squeeze(-1)
    masked = draw.x_t == mask_id
    return torch.where(masked, -logp / draw.t_tok, torch.zeros_like(logp))


def noisy_logits_vectorized(model: BD3LM, x_t: torch.Tensor, x_0: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """All blocks' denoising logits in one pass over x_t ⊕ x_0 (B, 2L)."""
    return model.forward_train(x_t, x_0, valid)


def noisy_logits_per_block(model: BD3LM, x_t: torch.Tensor, x_0: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The same logits, one forward per block over (clean earlier blocks ⊕ noisy block b)."""
    size = model.config.block_size
    n = x_0.shape[1]
    out = []
    for start in range(0, n, size):
        end = min(start + size, n)
        view = torch.cat((x_0[:, :start], x_t[:, start:end]), dim=1)
        out.append(model(view, valid[:, :end])[:, start:end])
    return torch.cat(out, dim=1)


def nelbo_terms(model: BD3LM, x_0: torch.Tensor, generators: Generators, *, estimator: Estimator | None = None,
                **kwargs) -> torch.Tensor:
    """Per-token NELBO contributions (B, L). Without an estimator, or with `mc`: the mean over the Monte
    Carlo draws of `nelbo_samples` (`samples`, or the estimator's passes); otherwise `nelbo_planned`."""
    if estimator is None:
        return nelbo_samples(model, x_0, generators, **kwargs).mean(dim=1)
    if estimator.name == "mc":
        if kwargs.pop("samples", 1) != 1:
            raise ValueError("give the mc samples once: samples= or the estimator's passes, not both")
    elif "samples" in kwargs or "antithetic" in kwargs:
        raise ValueError(f"samples/antithetic belong to the mc estimator, not {estimator.name}")
    return nelbo_estimates(model, x_0, generators, estimator, **kwargs).mean(dim=1)


def nelbo_estimates(model: BD3LM, x_0: torch.Tensor, generators: Generators, estimator: Estimator,
                    **kwargs) -> torch.Tensor:
    """The one dispatch on the estimator: per-token NELBO contributions (B, K, L), one row per Monte Carlo
    draw for `mc` (K = its passes), one planned estimate for `exact`, `stratified` and `auto` (K = 1).
    Keyword arguments as `nelbo_samples` / `nelbo_planned`."""
    if estimator.name == "mc":
        return nelbo_samples(model, x_0, generators, samples=estimator.passes, **kwargs)
    return nelbo_planned(model, x_0, generators, estimator, **kwargs)[:, None]


def default_eligible(valid: torch.Tensor) -> torch.Tensor:
    """The tokens a bound scores by default (B, L) bool: every valid token but the first, which stays clean
    (the reference's `ignore_bos`)."""
    eligible = valid.clone()
    eligible[:, 0] = False
    return eligible


def scored_tokens(x_0: torch.Tensor, valid: torch.Tensor | None, eligible: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, eligible) with their defaults: every token valid; `default_eligible`; eligible ⊆ valid."""
    valid = torch.ones_like(x_0, dtype=torch.bool) if valid is None else valid
    eligible = default_eligible(valid) if eligible is None else eligible
    return valid, eligible & valid


def _scored(x_0: torch.Tensor, valid: torch.Tensor | None, eligible: torch.Tensor | None, model_length: int):
    if x_0.shape[1] > model_length:
        raise ValueError(f"sequence length {x_0.shape[1]} exceeds model_length {model_length}")
    return scored_tokens(x_0, valid, eligible)


def nelbo_samples(model: BD3LM, x_0: torch.Tensor, generators: Generators, *, eligible: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None, samples: int = 1, eps_min: float = 1e-3, eps_max: float = 1.0,
                  antithetic: bool = True, vectorized: bool = True) -> torch.Tensor:
    """Per-token NELBO contributions (B, samples, L), one row per Monte Carlo draw.

    x_0 (B, L) with L ≤ model_length; `valid` marks real tokens (right padding is False); `eligible`
    marks the tokens being scored (default: every valid token but the first, as `ignore_bos` does).
    """
    cfg = model.config
    valid, eligible = _scored(x_0, valid, eligible, cfg.model_length)
    draw = draw_noise(x_0, eligible, cfg.block_size, cfg.mask_id, generators, samples=samples,
                      eps_min=eps_min, eps_max=eps_max, antithetic=antithetic, lengths=valid.sum(1).tolist())
    x0_rep = x_0.repeat_interleave(samples, dim=0)
    valid_rep = valid.repeat_interleave(samples, dim=0)
    forward = noisy_logits_vectorized if vectorized else noisy_logits_per_block
    logits = forward(model, draw.x_t, x0_rep, valid_rep)
    terms = terms_from_logits(logits, draw, x0_rep, cfg.mask_id)  # (B·samples, L)
    return terms.view(x_0.shape[0], samples, -1)


def nelbo_planned(model: BD3LM, x_0: torch.Tensor, generators: Generators, estimator: Estimator, *,
                  eligible: torch.Tensor | None = None, valid: torch.Tensor | None = None, eps_min: float = 1e-3,
                  eps_max: float = 1.0, vectorized: bool = True, max_rows: int = 64) -> torch.Tensor:
    """Per-token NELBO contributions (B, L) float64 under an `exact`, `stratified` or `auto` plan.

    Each row plans its passes from its own generator and its own scored tokens, so its estimate does not
    depend on the batch; the passes of all rows are then run `max_rows` at a time.
    """
    cfg = model.config
    valid, eligible = _scored(x_0, valid, eligible, cfg.model_length)
    plans = [row_plan(eligible[r].cpu(), cfg.block_size, eps_min, eps_max, estimator, gen)
             for r, gen in enumerate(per_row(generators, x_0.shape[0]))]
    owner = torch.cat([torch.full((p.masks.shape[0],), r) for r, p in enumerate(plans)])  # (P_total,)
    first = torch.cumsum(torch.tensor([0] + [p.masks.shape[0] for p in plans[:-1]]), 0)  # each row's pass 0
    masks = torch.cat([p.masks for p in plans]).to(x_0.device)  # (P_total, L)
    coefs = torch.cat([p.coefs for p in plans]).to(x_0.device)
    forward = noisy_logits_vectorized if vectorized else noisy_logits_per_block
    nll = torch.zeros(masks.shape, dtype=torch.float64, device=x_0.device)  # masked tokens' −log p_θ per pass
    for start in range(0, owner.numel(), max_rows):
        rows = owner[start : start + max_rows].to(x_0.device)
        x0 = x_0[rows]
        x_t = torch.where(masks[start : start + max_rows], torch.full_like(x0, cfg.mask_id), x0)
        logp = subs_log_probs(forward(model, x_t, x0, valid[rows]), x_t, cfg.mask_id)
        nll[start : start + max_rows] = -logp.gather(-1, x0[..., None]).squeeze(-1).double()  # (rows, L)
    nll = torch.where(masks, nll, 0.0)
    out = torch.zeros(x_0.shape, dtype=torch.float64, device=x_0.device)
    out.index_add_(0, owner.to(x_0.device), coefs * nll)
    control = torch.stack([p.control for p in plans]).to(x_0.device)  # (B, L)
    return out + control * nll[first.to(x_0.device)]
