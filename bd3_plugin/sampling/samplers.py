"""One denoising step of each sampler, for one noisy block of a batch (spec §4), and the probability of
the positions it chose.

Pure functions: logits of the block in, a `StepResult` (the positions to reveal and their tokens) out. A
sampler whose positions do not depend on the logits (first-hitting at temperature > 0) chooses them before
the pass (`first_hitting_choice`), so that the pass computes logits only where they are read. Each row
draws only from its own generator and only while it still has masks, so a row's tokens never depend on
what else is in the batch. Probabilities and Gumbel noise are float64 (the paper: fp32 noise lowers
entropy). The (n, V) distributions of a step are computed a chunk of slots at a time (`CHUNK_ENTRIES`), so
their float64 temporaries never cover all n slots at once. `registry.py` puts each sampler behind one
interface.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bd3_plugin.core.subs import subs_logits

_TIE = 1e-6
# Vocabulary entries whose distributions one chunk of a step computes at once: a chunk holds
# max(1, CHUNK_ENTRIES // V) slots, so its float64 temporaries stay near c' · 4 Mi entries whatever n is
# (vllm_backend/README.md, "Memory of a block step").
CHUNK_ENTRIES = 1 << 22


@dataclass(frozen=True, eq=False)  # tensors have no single truth value
class StepResult:
    """What one step decided for a block of B rows. `scored` and `probs` are set when the step was asked
    for its distributions (`with_probs`), so that a trajectory recorder needs no second softmax."""

    reveal: torch.Tensor  # (B, L') bool: the slots revealed
    tokens: torch.Tensor  # (B, L') long: their tokens (threshold: the proposal at every masked slot)
    scored: torch.Tensor | None = None  # (B, L') bool: where p_θ was computed
    probs: torch.Tensor | None = None  # (n, V) float64: those distributions, row-major


def nucleus_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most probable tokens whose cumulative probability is ≤ top_p (the token that crosses
    top_p is excluded, unlike Hugging Face's top-p), always at least the top one; renormalise."""
    if top_p >= 1.0:
        return probs
    ranked = probs.sort(dim=-1, descending=True)
    keep_sorted = ranked.values.cumsum(dim=-1) <= top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(-1, ranked.indices, keep_sorted)
    del ranked, keep_sorted  # the sort's (…, V) values and order are not needed past the mask
    kept = probs.masked_fill(~keep, 0.0)  # probs · keep, without a float64 copy of the mask
    return kept / kept.sum(dim=-1, keepdim=True)


def top_k_filter(probs: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep exactly the `top_k` most probable tokens, ties at the k-th broken by the lowest token id;
    renormalise. Off when top_k is None, ≤ 0 or ≥ V.

    vLLM keeps every token tied with the k-th; keeping exactly k makes top_k = 1 the argmax (the lowest id
    among ties), the token greedy decoding takes."""
    if top_k is None or top_k <= 0 or top_k >= probs.shape[-1]:
        return probs
    # A stable descending sort keeps equal probabilities in id order, so the first k win the ties.
    # (…, k), a copy: the sort's whole (…, V) order is freed at once
    order = probs.sort(dim=-1, descending=True, stable=True).indices[..., :top_k].clone()
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, True)
    kept = probs.masked_fill(~keep, 0.0)  # probs · keep, without a float64 copy of the mask
    del keep
    return kept / kept.sum(dim=-1, keepdim=True)


def token_probs(logits: torch.Tensor, mask_id: int, temperature: float = 1.0, top_p: float = 1.0,
                top_k: int | None = 0) -> torch.Tensor:
    """p_θ(x_0) at masked positions (…, V) in float64: the mask is never predicted (SUBS).

    The filters apply in vLLM's order: temperature, then top-k, then the nucleus over the renormalised
    top-k distribution. Temperature 0 means greedy: its probabilities are those at temperature 1 with no
    filter (used as confidences), as vLLM drops top-k and top-p from greedy requests; the argmax is the same
    either way, and the confidences that order the reveals stay the model's own.
    """
    logits = subs_logits(logits, mask_id, torch.float64)
    if temperature != 0:
        logits.div_(temperature)  # a copy of our own: the same arithmetic as logits / temperature
    probs = torch.softmax(logits, dim=-1)
    del logits  # not needed past the softmax: the filters below run without it
    if temperature == 0:
        return probs
    probs = top_k_filter(probs, top_k)  # rebound, so that the softmax is freed before the nucleus sorts
    return nucleus_filter(probs, top_p)


def _row_draws(generators: list[torch.Generator], counts: list[int], width: int | None, device) -> torch.Tensor:
    """Uniform float64 draws, `counts[r]` (× width) from row r's own generator, stacked in row order. Each
    row's draw is one `uniform_` on its own generator, as `torch.rand` of that shape makes it, written in
    place (no copy of the whole) when the generator is on `device`."""
    shape = (lambda n: (n,)) if width is None else (lambda n: (n, width))
    draws = torch.empty(shape(sum(counts)), dtype=torch.float64, device=device)
    start = 0
    for g, n in zip(generators, counts):
        part = draws[start : start + n]
        start += n
        if not n:
            continue
        if g.device == part.device:
            part.uniform_(generator=g)
        else:
            part.copy_(torch.rand(shape(n), generator=g, dtype=torch.float64, device=g.device))
    return draws


def draw_tokens(probs: torch.Tensor, uniforms: torch.Tensor | None) -> torch.Tensor:
    """One token per row of probs (n, V): argmax(p / E) with E = −log U ~ Exp(1) from float64 uniforms
    (n, V), or argmax(p) when `uniforms` is None (greedy). The uniforms are overwritten (they become the
    noise, then p / E): the draw needs no other (n, V) tensor."""
    if uniforms is None:
        return probs.argmax(dim=-1)
    noise = uniforms.add_(1e-10).log_().neg_().add_(1e-10)  # 1e-10 − log(U + 1e-10), exactly, in place
    return torch.div(probs, noise, out=noise).argmax(dim=-1)


@dataclass(frozen=True, eq=False)
class Proposals:
    """A token drawn at each slot a step reads and its probability under the sampler's distribution."""

    tokens: torch.Tensor  # (n,) long, the slots in row-major order (or scattered to (B, L'), `_proposals`)
    confidence: torch.Tensor  # (n,) float64, the same order: each token's probability
    probs: torch.Tensor | None  # (n, V) float64 when kept (a recorder asked), else None


@dataclass(frozen=True)
class _Chunk:
    start: int  # the chunk's slots, [start, stop) in row-major order
    stop: int
    rows: range  # the rows whose draws it makes (all of them: a row's draw is never split)


def proposal_chunks(counts: list[int] | None, n: int, vocab: int) -> list[_Chunk]:
    """The chunks a step's n slots are computed in, each of at most max(1, CHUNK_ENTRIES // vocab) slots.
    With `counts` (slots per row, above temperature 0) chunks end at row boundaries, consecutive rows packed
    while they fit, a row with more slots alone: each row's uniforms are then one draw from its own
    generator, the stream it gives unchunked (on CUDA a draw split in two continues elsewhere)."""
    limit = max(1, CHUNK_ENTRIES // vocab)
    if counts is None:  # greedy: nothing is drawn, any slot may end a chunk
        return [_Chunk(a, min(a + limit, n), range(0)) for a in range(0, n, limit)]
    chunks = []
    first = 0
    start = 0
    stop = 0
    for r, count in enumerate(counts):
        if stop + count - start > limit and r > first:
            chunks.append(_Chunk(start, stop, range(first, r)))
            first = r
            start = stop
        stop += count
    if first < len(counts) and stop > start:
        chunks.append(_Chunk(start, stop, range(first, len(counts))))
    return chunks


def _propose(logits: torch.Tensor, where: torch.Tensor, generators: list[torch.Generator], mask_id: int,
             temperature: float, top_p: float, top_k: int, keep_probs: bool) -> Proposals:
    """Tokens drawn at the (B, L') positions `where` (row-major order), a chunk of slots at a time: the
    float64 distributions, filters and draws exist for one chunk only (the tokens are those of the whole)."""
    slots = where.flatten().nonzero().squeeze(1)  # (n,) flat indices of the slots read, row-major
    table = logits.flatten(0, 1)  # (B·L', V), a view
    n = slots.shape[0]
    vocab = logits.shape[-1]
    greedy = temperature == 0
    counts = None if greedy else where.sum(dim=1).tolist()  # on the host: each row draws from its own generator
    tokens = torch.empty(n, dtype=torch.long, device=logits.device)
    confidence = torch.empty(n, dtype=torch.float64, device=logits.device)
    probs = torch.empty(n, vocab, dtype=torch.float64, device=logits.device) if keep_probs else None
    for chunk in proposal_chunks(counts, n, vocab):
        part = slice(chunk.start, chunk.stop)
        q = token_probs(table[slots[part]], mask_id, temperature, top_p, top_k)  # (m, V)
        uniforms = None if greedy else _row_draws([generators[r] for r in chunk.rows],
                                                  [counts[r] for r in chunk.rows], vocab, logits.device)
        drawn = draw_tokens(q, uniforms)
        del uniforms
        tokens[part] = drawn
        confidence[part] = q.gather(-1, drawn[:, None]).squeeze(-1)
        if probs is not None:
            probs[part] = q
        del q
    return Proposals(tokens, confidence, probs)


def greedy_positions(confidence: torch.Tensor, masked: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The greedy choice of positions, shared by every sampler at temperature 0 (and by the threshold
    sampler's fallback): per row, the `count[r]` most confident masked positions, taken one at a time as
    the most confident remaining position, the leftmost among ties.

    Ties are judged with a tolerance: positions equal in exact arithmetic (an all-mask block with no
    context) differ in the last bits between batch layouts, and the choice must not depend on the batch.
    confidence (B, L') float64, masked (B, L') bool, count (B,) long -> reveal (B, L') bool.
    """
    reveal = torch.zeros_like(masked)
    left = masked.clone()
    for _ in range(int(count.max()) if count.numel() else 0):
        want = left.any(dim=1) & (reveal.sum(dim=1) < count)  # (B,) rows still choosing
        conf = torch.where(left, confidence, torch.full_like(confidence, -1.0))
        best = left & (conf >= conf.max(dim=1, keepdim=True).values - _TIE)
        best &= (best.long().cumsum(dim=1) == 1) & want[:, None]
        reveal |= best
        left &= ~best
    return reveal


def _proposals(logits: torch.Tensor, masked: torch.Tensor, generators: list[torch.Generator], mask_id: int,
               temperature: float, top_p: float, top_k: int, keep_probs: bool) -> Proposals:
    """A token proposed at every masked position and its probability, scattered to (B, L'): tokens, and
    confidence in float64 (−1 where not masked); the distributions (n_masked, V) when kept. Draws only at
    temperature > 0."""
    proposal = _propose(logits, masked, generators, mask_id, temperature, top_p, top_k, keep_probs)
    confidence = torch.full(masked.shape, -1.0, dtype=torch.float64, device=masked.device)
    confidence[masked] = proposal.confidence
    tokens = torch.zeros(masked.shape, dtype=torch.long, device=masked.device)
    tokens[masked] = proposal.tokens
    return Proposals(tokens, confidence, proposal.probs)


def _result(reveal: torch.Tensor, tokens: torch.Tensor, scored: torch.Tensor, probs: torch.Tensor | None,
            with_probs: bool) -> StepResult:
    return StepResult(reveal, tokens, scored, probs) if with_probs else StepResult(reveal, tokens)


def _greedy_step(logits: torch.Tensor, masked: torch.Tensor, count: torch.Tensor, mask_id: int, top_p: float,
                 top_k: int, with_probs: bool) -> StepResult:
    """Temperature 0: argmax tokens at the `count` most confident masked positions; no generator is used."""
    proposal = _proposals(logits, masked, [], mask_id, 0.0, top_p, top_k, with_probs)
    reveal = greedy_positions(proposal.confidence, masked, count)
    return _result(reveal, proposal.tokens, masked, proposal.probs, with_probs)


def first_hitting_choice(masked: torch.Tensor, generators: list[torch.Generator], temperature: float
                         ) -> torch.Tensor:
    """Before the pass: the slots whose logits first-hitting will read, (B, L') bool. The position does
    not depend on the logits at temperature > 0 (Zheng et al.'s first-hitting time for α_t = 1 − t: the
    next event reveals one token and which one is uniform), so it is drawn now, one uniform from the
    generator of each row with masks, and the pass needs logits at that one slot. At temperature 0 the
    position is the most confident one, so every masked slot is read."""
    if temperature == 0:
        return masked
    count = masked.sum(dim=1)  # (B,)
    live = count > 0
    u = torch.zeros(masked.shape[0], dtype=torch.float64, device=masked.device)
    u[live] = _row_draws(generators, live.long().tolist(), None, masked.device)
    k = (u * count).floor().long()  # which masked slot, 0-based
    rank = masked.long().cumsum(dim=1) - 1  # (B, L') rank of each masked slot
    return masked & (rank == k[:, None])


def first_hitting_step(logits: torch.Tensor, read: torch.Tensor, generators: list[torch.Generator], *,
                       mask_id: int, temperature: float, top_p: float, top_k: int = 0, with_probs: bool = False
                       ) -> StepResult:
    """After the pass: reveal one of the slots `first_hitting_choice` chose to read per row, with a token
    from p_θ: at temperature > 0 the one drawn slot, at temperature 0 the greedy one (`greedy_positions`:
    the most confident, leftmost among ties). Only the `read` slots of `logits` are used.

    logits (B, L', V), read (B, L') -> StepResult. Every step function, given `with_probs=True`, also
    returns where it computed p_θ (B, L') and those distributions (n, V) row-major.
    """
    if temperature == 0:
        return _greedy_step(logits, read, read.any(dim=1).long(), mask_id, top_p, top_k, with_probs)
    return _reveal_with_draws(logits, read, generators, mask_id, temperature, top_p, top_k, with_probs)


def _reveal_with_draws(logits, reveal, generators, mask_id, temperature, top_p, top_k, with_probs) -> StepResult:
    tokens = torch.zeros(reveal.shape, dtype=torch.long, device=reveal.device)
    proposal = _propose(logits, reveal, generators, mask_id, temperature, top_p, top_k, with_probs)
    tokens[reveal] = proposal.tokens
    return _result(reveal, tokens, reveal, proposal.probs, with_probs)


def ddpm_reveal_probability(t: float, s: float) -> float:
    """Probability that a masked token is revealed going from t to s < t: (t − s)/t, and 1 at s = 0."""
    return 1.0 if s <= 0 else (t - s) / t


def ddpm_selection_log_prob(n_masked: torch.Tensor, n_revealed: torch.Tensor, t: torch.Tensor, s: torch.Tensor
                            ) -> torch.Tensor:
    """log-prob that a DDPM step from t to s revealed exactly the slots it did, given the counts (θ-free):
    the Bernoulli terms n_rev·log p + (n_masked − n_rev)·log(1 − p), p = `ddpm_reveal_probability`.
    Arguments broadcast; levels are float64 tensors, so a whole step table is one call."""
    n_masked = n_masked.double()
    n_revealed = n_revealed.double()
    p = torch.where(s <= 0, torch.ones_like(s), (t - s) / t)  # ddpm_reveal_probability, elementwise
    kept = n_masked - n_revealed
    return n_revealed * p.log() + torch.where(kept > 0, kept * torch.log1p(-p), torch.zeros_like(kept))


def ddpm_greedy_count(n_masked: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """How many positions the DDPM step reveals at temperature 0: the stochastic step's expected number of
    reveals, n·(t − s)/t, rounded half up (all of them at s = 0). With the default grid (steps = L') a
    block that starts fully masked reveals exactly one token per step, so greedy DDPM follows the same
    schedule as its stochastic form in expectation. The 1e-9 keeps a half computed as 0.4999… in floating
    point on the same side as an exact half."""
    expected = n_masked.double() * ddpm_reveal_probability(t, s)
    return torch.minimum(torch.floor(expected + 0.5 + 1e-9).long(), n_masked)


def ddpm_step(logits: torch.Tensor, masked: torch.Tensor, generators: list[torch.Generator], *, t: float,
              s: float, mask_id: int, temperature: float, top_p: float, top_k: int = 0, with_probs: bool = False
              ) -> StepResult:
    """Posterior step from t to s < t: a masked token stays masked with probability s/t, else it takes a
    token from p_θ(x_0). At s = 0 every masked token is revealed. At temperature 0 the step reveals
    `ddpm_greedy_count` positions chosen by `greedy_positions`, with argmax tokens."""
    if temperature == 0:
        return _greedy_step(logits, masked, ddpm_greedy_count(masked.sum(dim=1), t, s), mask_id, top_p, top_k,
                            with_probs)
    u = _row_draws(generators, masked.sum(dim=1).tolist(), None, masked.device)
    reveal = torch.zeros_like(masked)
    reveal[masked] = u < ddpm_reveal_probability(t, s)
    return _reveal_with_draws(logits, reveal, generators, mask_id, temperature, top_p, top_k, with_probs)


def threshold_step(logits: torch.Tensor, masked: torch.Tensor, generators: list[torch.Generator], *,
                   threshold: float, mask_id: int, temperature: float, top_p: float, top_k: int = 0,
                   with_probs: bool = False) -> StepResult:
    """Confidence-threshold parallel decoding: propose a token at every masked position and reveal those
    whose probability is ≥ threshold; when none is, reveal the single most confident one (the greedy
    position). At temperature 0 the proposals are the argmax tokens, so the step is deterministic."""
    proposal = _proposals(logits, masked, generators, mask_id, temperature, top_p, top_k, with_probs)
    reveal = masked & (proposal.confidence >= threshold)
    stuck = masked.any(dim=1) & ~reveal.any(dim=1)
    reveal |= greedy_positions(proposal.confidence, masked, stuck.long())
    return _result(reveal, proposal.tokens, masked, proposal.probs, with_probs)


def threshold_miss_log_prob(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """log P(the token proposed at a slot falls below the threshold) = log Σ_v q(v)·1[q(v) < τ], for the
    sampler's distributions q (n, V) at slots a threshold step left masked -> (n,)."""
    return (probs * (probs < threshold)).sum(dim=-1).log()
