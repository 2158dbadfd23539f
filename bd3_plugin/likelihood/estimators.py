"""Estimators of the block NELBO (spec §3) as plans of 2L passes: exact enumeration, stratified sampling.

Under t ~ U[a, b], mask probability t and weight 1/t, the bound of one block with m scored tokens is a
finite sum over the block's mask subsets S:

    NELBO(block) = Σ_{k=1..m} w_k Σ_{|S|=k} Σ_{i∈S} −log p_θ(x_i | x_{¬S}, clean earlier blocks),
    w_k = (1/(b−a)) ∫_a^b t^{k−1} (1−t)^{m−k} dt        (a = b: w_k = a^{k−1} (1−a)^{m−k}).

Blocks are conditionally independent given the clean earlier blocks, so one 2L pass evaluates one subset
of every block at once. A *plan* lists, for each pass, the masked positions and each one's coefficient;
the estimate is Σ_passes Σ_masked coefficient · (−log p_θ).

- `exact`: every subset with w_k > 0, coefficient w_k: the bound itself, with no variance.
- `stratified`: strata of the mask count k. The stratum weight W_k = C(m,k)·w_k is known exactly, so
  W_k · (the mean of f(S) over uniform subsets of size k) is unbiased, whatever the allocation.
- `mc`: t ~ U[a, b] per block (noise.py's `draw_noise`); not planned here.
- `auto`: `exact` when it fits in the pass budget, else `stratified`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np
import torch

ESTIMATORS = ("auto", "exact", "stratified", "mc")
DEFAULT = ("auto", 16)  # (estimator, passes): ≥ 0.95 on synthetic_mc for L' = 4, 16 and 128 (LM_EVAL.md)


@dataclass(frozen=True)
class Estimator:
    """Which estimator, and the most 2L passes it may spend on one sequence (for `mc`: its samples)."""

    name: str = DEFAULT[0]
    passes: int = DEFAULT[1]

    def __post_init__(self) -> None:
        if self.name not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.name!r}")
        if not isinstance(self.passes, int) or isinstance(self.passes, bool) or self.passes < 1:
            raise ValueError(f"passes must be a positive integer, got {self.passes!r}")

    def __str__(self) -> str:
        return f"{self.name}/{self.passes}"


def choose_estimator(estimator: str | None, passes: int | None, mc_samples: int | None) -> Estimator:
    """One estimator from the user's three knobs. `mc_samples=K` alone means `mc` with K passes; beside
    another estimator, or beside a different `passes`, it is ambiguous and refused."""
    if mc_samples is not None:
        if estimator not in (None, "mc"):
            raise ValueError(f"mc_samples applies to the mc estimator only, not estimator={estimator}; "
                             f"use passes=N")
        if passes is not None and passes != mc_samples:
            raise ValueError(f"mc_samples={mc_samples} and passes={passes} disagree; give one of them")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        return Estimator("mc", mc_samples)
    return Estimator(DEFAULT[0] if estimator is None else estimator, DEFAULT[1] if passes is None else passes)


# ---- weights ---------------------------------------------------------------------------------------
@lru_cache(maxsize=4096)
def _log_weights(m: int, a: float, b: float) -> tuple[float, ...]:
    if not 0.0 <= a <= b <= 1.0 or b == 0.0:
        raise ValueError(f"the t-interval must satisfy 0 <= a <= b <= 1 and b > 0, got [{a}, {b}]")
    k = torch.arange(1, m + 1, dtype=torch.float64)
    if a == b:
        t = torch.tensor([a], dtype=torch.float64)
        log_g = torch.zeros(1, dtype=torch.float64)
    else:
        # The integrand is a polynomial of degree m − 1: Gauss–Legendre with ⌊m/2⌋ + 1 nodes is exact, and
        # a sum of positive terms in log space does not cancel or underflow (w_k reaches 1e-300 at m ~ 1000).
        nodes, gw = np.polynomial.legendre.leggauss(m // 2 + 1)
        t = torch.from_numpy((b - a) / 2 * nodes + (a + b) / 2)
        log_g = torch.from_numpy(gw / 2).log()  # (1/(b−a)) · (b−a)/2 · gw
    log_f = torch.xlogy(k - 1, t[:, None]) + torch.xlogy(m - k, 1 - t[:, None])  # (nodes, m)
    log_w = torch.logsumexp(log_f + log_g[:, None], dim=0)
    return (-math.inf, *log_w.tolist())


def log_subset_weights(m: int, a: float, b: float) -> torch.Tensor:
    """log w_k for k = 0..m (m + 1,), float64; −inf where w_k = 0 (k = 0 always: nothing is masked)."""
    return torch.tensor(_log_weights(int(m), float(a), float(b)), dtype=torch.float64)


def subset_weights(m: int, a: float, b: float) -> torch.Tensor:
    """w_k for k = 0..m: the weight of every subset of k masked tokens among m."""
    return log_subset_weights(m, a, b).exp()


def _log_comb(m: int, k: int) -> float:
    return math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1)


def _support(m: int, a: float, b: float) -> list[int]:
    log_w = _log_weights(m, a, b)
    return [k for k in range(1, m + 1) if log_w[k] > -math.inf]


def exact_passes(m: int, a: float, b: float) -> int:
    """Passes `exact` needs for a block of m scored tokens: the subsets of positive weight."""
    return sum(math.comb(m, k) for k in _support(m, a, b))


def check_fits(estimator: Estimator, block_size: int, a: float, b: float) -> None:
    """Refuse `exact` up front when a full block of scored tokens needs more passes than allowed."""
    need = exact_passes(block_size, a, b)
    if estimator.name == "exact" and need > estimator.passes:
        raise ValueError(f"exact needs {need} passes for a block of {block_size} scored tokens, more than "
                         f"passes={estimator.passes}; use stratified or auto")


# ---- allocation of a block's passes to strata ------------------------------------------------------
def _stratum_scale(m: int, a: float, b: float, k: int) -> tuple[float, float]:
    """(W_k, v_k): the stratum weight and a variance proxy of f(S) for |S| = k, namely that of a sum of k
    draws without replacement from m equally spread per-token losses: k (m − k) / (m − 1)."""
    w = math.exp(_log_weights(m, a, b)[k] + _log_comb(m, k))
    return w, (k * (m - k) / (m - 1) if m > 1 else 0.0)


# The per-token loss rises with the masked fraction k/m by a few nats (no context against full context),
# against a spread of about as much between tokens at one fraction: their squared ratio, for the proxy.
DRIFT = 2.0


@lru_cache(maxsize=4096)
def allocation(m: int, a: float, b: float, passes: int) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Strata of the mask count for a block of m scored tokens and the pass budget, as (counts, draws):
    one count drawn `draws` times, or a group of contiguous counts drawn once (k with probability ∝ W_k·k).

    When every subset fits, each count takes all of its C(m,k) subsets (the exact plan). Otherwise a dynamic
    programme over the counts picks the strata that minimise a variance proxy, in units of the spread of
    per-token losses: a count drawn n times costs W_k² v_k (C − n) / (n (C − 1)); a group costs
    (Σ W_k k)(Σ W_k v_k / k) for the tokens plus DRIFT · (Σ W_k k)² · Var(k/m), because the per-token loss
    rises with the masked fraction, and a draw from a group reads it at one fraction for all.
    """
    ks = _support(m, a, b)
    comb = [math.comb(m, k) for k in ks]
    if sum(comb) <= passes:
        return tuple(((k,), c) for k, c in zip(ks, comb))
    if passes >= 2 and ks[-1] == m:  # the whole block masked first: it feeds the control variate
        return (((m,), 1),) + _strata(tuple(ks[:-1]), m, a, b, passes - 1)
    return _strata(tuple(ks), m, a, b, passes)


def _strata(ks: tuple[int, ...], m: int, a: float, b: float, passes: int) -> tuple[tuple[tuple[int, ...], int], ...]:
    k = np.array(ks, dtype=np.float64)
    w = np.array([_stratum_scale(m, a, b, c)[0] for c in ks])
    v = np.array([_stratum_scale(m, a, b, c)[1] for c in ks])
    comb = np.array([float(math.comb(m, c)) for c in ks])
    r = k / m
    z, s1, e1, e2 = (np.concatenate(([0.0], np.cumsum(x))) for x in (w * k, w * v / k, w * k * r, w * k * r * r))
    n_k = len(ks)
    best = np.full((passes + 1, n_k + 1), np.inf)  # best[p, j]: counts [0, j) covered with exactly p draws
    best[0, 0] = 0.0
    choice = {}
    for j in range(1, n_k + 1):
        c = comb[j - 1]
        for p in range(1, passes + 1):
            ns = np.arange(1, int(min(c, p)) + 1)
            single = 0.0 if c == 1 else w[j - 1] ** 2 * v[j - 1] * (c - ns) / (ns * (c - 1))
            cand = best[p - ns, j - 1] + single
            n_best = int(ns[np.argmin(cand)])
            best[p, j] = cand.min()
            choice[p, j] = ("one", n_best)
            if j >= 2:
                i = np.arange(0, j - 1)
                zz = z[j] - z[i]
                group = zz * (s1[j] - s1[i]) + DRIFT * (zz * (e2[j] - e2[i]) - (e1[j] - e1[i]) ** 2)
                cost = best[p - 1, i] + group
                if cost.min() < best[p, j]:
                    best[p, j] = cost.min()
                    choice[p, j] = ("group", int(i[np.argmin(cost)]))
    p = int(np.argmin(best[:, n_k]))
    out = []
    j = n_k
    while j > 0:
        kind, x = choice[p, j]
        if kind == "one":
            out.append(((ks[j - 1],), x))
            p -= x
            j -= 1
        else:
            out.append((ks[x:j], 1))
            p -= 1
            j = x
    return tuple(reversed(out))


# ---- plans -----------------------------------------------------------------------------------------
def _random_subset(m: int, k: int, generator: torch.Generator) -> tuple[int, ...]:
    return tuple(sorted(torch.randperm(m, generator=generator)[:k].tolist()))


def block_plan(m: int, a: float, b: float, estimator: Estimator,
               generator: torch.Generator) -> list[tuple[tuple[int, ...], float]]:
    """(subset of 0..m−1, coefficient) per pass for one block of m scored tokens. A stratified plan that
    starts with the whole block masked carries a control variate (`control_weights`)."""
    log_w = _log_weights(m, a, b)
    if estimator.name == "exact":
        return [(s, math.exp(log_w[k])) for k in _support(m, a, b) for s in combinations(range(m), k)]
    out = []
    for counts, n in allocation(m, a, b, estimator.passes):
        if len(counts) > 1:  # a group of counts, one draw: k with probability ∝ W_k k
            w = torch.tensor([_stratum_scale(m, a, b, k)[0] * k for k in counts], dtype=torch.float64)
            pick = int(torch.multinomial(w, 1, generator=generator))
            k = counts[pick]
            coef = _stratum_scale(m, a, b, k)[0] * float(w.sum() / w[pick])
            out.append((_random_subset(m, k, generator), coef))
            continue
        k = counts[0]
        if n >= math.comb(m, k):  # the whole stratum: its subsets at their own weight
            out += [(s, math.exp(log_w[k])) for s in combinations(range(m), k)]
            continue
        chosen: dict[tuple[int, ...], None] = {}
        while len(chosen) < n:  # distinct subsets: sampling without replacement
            chosen.setdefault(_random_subset(m, k, generator))
        coef = _stratum_scale(m, a, b, k)[0] / n
        out += [(s, coef) for s in chosen]
    return out


def uses_control(m: int, a: float, b: float, passes: int) -> bool:
    """Whether a stratified plan of this block starts with its full mask (pass 0) and samples the rest."""
    strata = allocation(m, a, b, passes)
    return len(strata) > 1 and strata[0] == ((m,), 1) and exact_passes(m, a, b) > passes


def control_weights(m: int, plan: list[tuple[tuple[int, ...], float]]) -> torch.Tensor:
    """Per-token weights (m,) of g_i = −log p_θ(x_i | whole block masked), read off pass 0.

    A sampled pass with coefficient c and subset S of size k gets the control variate
    c·β·((k/m)·Σ_block g − Σ_S g), β = k/m: zero in expectation for any S uniform among k-subsets, so the
    estimate stays unbiased, while a token that is hard with the whole block masked tends to be hard
    with part of it masked, so the sum cancels most of the spread due to which tokens S happens to hold.
    """
    out = torch.zeros(m, dtype=torch.float64)
    for subset, coef in plan[1:]:
        beta = len(subset) / m
        out += coef * beta * len(subset) / m
        out[list(subset)] -= coef * beta
    return out


@dataclass(frozen=True)
class RowPlan:
    masks: torch.Tensor  # (P, n) bool: the masked tokens of each pass
    coefs: torch.Tensor  # (P, n) float64: the weight of each masked token's −log p_θ
    control: torch.Tensor  # (n,) float64: the weight of each token's −log p_θ in pass 0 (its block fully masked)


def row_plan(eligible: torch.Tensor, block_size: int, a: float, b: float, estimator: Estimator,
             generator: torch.Generator) -> RowPlan:
    """The passes of one row; `eligible` (n,) marks the scored tokens. Pass j holds entry j of every
    block's plan, so the row has as many passes as its longest block plan."""
    name = estimator.name
    blocks: dict[int, list[int]] = {}
    for p in eligible.nonzero().flatten().tolist():
        blocks.setdefault(p // block_size, []).append(p)
    need = max((exact_passes(len(ps), a, b) for ps in blocks.values()), default=0)
    if name == "exact" and need > estimator.passes:
        raise ValueError(f"exact needs {need} passes for a block of {max(map(len, blocks.values()))} scored "
                         f"tokens, more than passes={estimator.passes}; use stratified or auto")
    if name == "auto":
        name = "exact" if need <= estimator.passes else "stratified"
    est = Estimator(name, estimator.passes)
    n = eligible.numel()
    plans = []
    control = torch.zeros(n, dtype=torch.float64)
    for _, ps in sorted(blocks.items()):
        plan = block_plan(len(ps), a, b, est, generator)
        if name == "stratified" and uses_control(len(ps), a, b, est.passes):
            control[ps] = control_weights(len(ps), plan)
        plans.append([(tuple(ps[i] for i in s), c) for s, c in plan])
    n_pass = max((len(p) for p in plans), default=0)
    masks = torch.zeros(n_pass, n, dtype=torch.bool)
    coefs = torch.zeros(n_pass, n, dtype=torch.float64)
    for plan in plans:
        for j, (positions, coef) in enumerate(plan):
            masks[j, list(positions)] = True
            coefs[j, list(positions)] = coef
    return RowPlan(masks, coefs, control)
