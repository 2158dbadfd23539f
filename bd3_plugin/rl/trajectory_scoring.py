"""Scoring rollouts under the current weights, with gradients: the likelihood terms RL methods train on.

`score_trajectory` replays recorded trajectories exactly: in round r every denoised block shows the slots
revealed before its pass r and masks the rest, and one pass over x_t ⊕ x_0 (the training mask: each noisy
block sees itself and the clean earlier blocks, the context it had when it was sampled) scores the slots
revealed at pass r in every block of every trajectory at once. The other scorers serve methods that score
final tokens only: one-pass mean field (d1, wd1), the NELBO with noise shared between models (VRPO),
complementary masks (coupled-GRPO).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bd3_plugin.core.model import BD3LM
from bd3_plugin.likelihood.nelbo import NoiseDraw, draw_noise, scored_tokens, terms_from_logits
from bd3_plugin.core.generators import Generators, per_row
from bd3_plugin.sampling.registry import Sampler, sampler_for
from bd3_plugin.sampling.samplers import token_probs
from bd3_plugin.sampling.trajectory import Trajectory, raw_log_probs, token_terms

Step = tuple[int, int]  # (block, pass)


@dataclass
class TrajectoryScores:
    """Recomputed values aligned with the trajectory: slot fields (N,), step fields (S,)."""

    logprob: torch.Tensor  # under the rollout's sampled distribution (temperature, top-k, nucleus, SUBS)
    logprob_raw: torch.Tensor  # temperature 1, SUBS
    entropy: torch.Tensor  # of the sampled distribution
    scored: torch.Tensor  # (N,) bool: slots revealed in a scored step (others hold 0)
    step_logprob_tokens: torch.Tensor
    step_logprob_select: torch.Tensor  # NaN where the record has no closed form
    step_entropy_mean: torch.Tensor
    step_scored: torch.Tensor  # (S,) bool
    full_logprobs: dict[Step, torch.Tensor] = field(default_factory=dict)  # (n revealed, V) raw log-probs


def _canvas(model: BD3LM, trajectories: Sequence[Trajectory], steps):
    """x_0 (B, n), valid, each slot's reveal pass, its block, and which slots are wanted (B, n)."""
    cfg = model.config
    seqs = [t.sequence() for t in trajectories]
    n = max(len(s) for s in seqs)
    if n > cfg.model_length:
        raise ValueError(f"a trajectory of {n} tokens exceeds model_length {cfg.model_length}: the rollout "
                         f"slid its cache window, which one replay pass cannot reproduce")
    b = len(seqs)
    x_0 = torch.zeros(b, n, dtype=torch.long)
    valid = torch.zeros(b, n, dtype=torch.bool)
    wanted = torch.zeros(b, n, dtype=torch.bool)
    passes = torch.zeros(b, n, dtype=torch.long)
    block = torch.arange(n).expand(b, n) // cfg.block_size  # (B, n)
    for j, (t, seq) in enumerate(zip(trajectories, seqs)):
        if t.block_size != cfg.block_size or t.mask_id != cfg.mask_id:
            raise ValueError(f"trajectory {j} was sampled with block size {t.block_size} and mask id "
                             f"{t.mask_id}, the model has {cfg.block_size} and {cfg.mask_id}")
        off = t.first_block * cfg.block_size
        x_0[j, : len(seq)] = seq
        valid[j, : len(seq)] = True
        passes[j, off : len(seq)] = t.reveal_pass
        if steps is None or steps[j] is None:
            wanted[j] = passes[j] > 0
        else:
            for blk, p in steps[j]:
                wanted[j] |= (block[j] == blk) & (passes[j] == p)
    dev = model.device
    return x_0.to(dev), valid.to(dev), passes.to(dev), block.to(dev), wanted.to(dev)


def score_trajectory(model: BD3LM, trajectories: Sequence[Trajectory], *,
                     steps: Sequence[Sequence[Step] | None] | None = None,
                     full_vocab: Sequence[Sequence[Step]] | None = None) -> list[TrajectoryScores]:
    """Recompute each trajectory's per-token log-probs (sampled and raw), entropies and per-step terms
    under `model`, with gradients. `steps[j]`: the (block, pass) steps of trajectory j to score (None:
    all); `full_vocab[j]`: steps whose raw log-probs over the whole vocabulary are returned (exact KL).

    One forward of length 2n per reveal round needed, all trajectories and blocks at once. With the
    rollout's weights the values equal the recorded ones (float32 on CPU: within 1e-5).
    """
    for name, arg in (("steps", steps), ("full_vocab", full_vocab)):
        if arg is not None and len(arg) != len(trajectories):
            raise ValueError(f"{name} has {len(arg)} entries for {len(trajectories)} trajectories")
    full_vocab = full_vocab or [()] * len(trajectories)
    for j, asked in enumerate(full_vocab):
        extra = set(map(tuple, asked)) - set(map(tuple, steps[j] if steps and steps[j] is not None else asked))
        if extra:
            raise ValueError(f"full_vocab asks trajectory {j} for steps {sorted(extra)} that are not scored")
    x_0, valid, passes, block, wanted = _canvas(model, trajectories, steps)
    mask_id = model.config.mask_id
    parts = [dict(idx=[], lp=[], raw=[], ent=[], miss_idx=[], miss_grid=[], miss=[], full={}) for _ in trajectories]
    samplers = [sampler_for(t.sampler, mask_id) for t in trajectories]
    for r in sorted(set(passes[wanted].tolist())):
        now = wanted & (passes == r)  # (B, n) slots revealed at round r
        x_t = torch.where(passes >= r, torch.full_like(x_0, mask_id), x_0)
        logits = model.forward_train(x_t, x_0, valid)  # (B, n, V)
        for j, t in enumerate(trajectories):
            cfg = t.sampler
            part = parts[j]
            where = now[j].nonzero()[:, 0]
            if not len(where):
                continue
            lp, raw, ent = token_terms(logits[j, where], x_0[j, where], mask_id, cfg.temperature, cfg.top_p,
                                       cfg.top_k)
            off = t.first_block * t.block_size
            for key, value in (("idx", where - off), ("lp", lp), ("raw", raw), ("ent", ent)):
                part[key].append(value)
            if samplers[j].selection_reads_left:
                blocks_now = block[j, where].unique()
                miss = ((passes[j] > r) & torch.isin(block[j], blocks_now)).nonzero()[:, 0]
                part["miss_idx"].append(miss - off)
                # every step of a sampler that keeps no logits is a pass: its grid is its pass − 1
                part["miss_grid"].append(torch.full((len(miss),), r - 1))
                probs = token_probs(logits[j, miss], mask_id, cfg.temperature, cfg.top_p, cfg.top_k)
                part["miss"].append(samplers[j].left_log_prob(probs))
            for blk, p in full_vocab[j]:
                if p == r:
                    at = where[block[j, where] == blk]
                    part["full"][(blk, p)] = raw_log_probs(logits[j, at], mask_id)
    return [_assemble(t, part, sampler) for t, part, sampler in zip(trajectories, parts, samplers)]


def _scatter(n: int, idx: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """(n,) float64 with values at idx (differentiable), zeros elsewhere."""
    zero = torch.zeros(n, dtype=torch.float64)
    if not idx:
        return zero
    values = torch.cat(values)
    return zero.to(values.device).index_put((torch.cat(idx),), values)


def _step_rows(t: Trajectory, block: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The row of `t.steps` that holds each (block, grid) pair."""
    row = {k: i for i, k in enumerate(zip(t.steps.block.tolist(), t.steps.grid.tolist()))}
    return torch.tensor([row[k] for k in zip(block.tolist(), grid.tolist())], dtype=torch.long)


def _assemble(t: Trajectory, part: dict, sampler: Sampler) -> TrajectoryScores:
    n = len(t.tokens)
    st = t.steps
    gen = t.reveal_pass > 0
    slot_at = [torch.cat(part["idx"]).cpu()] if part["idx"] else []
    lp, raw, ent = (_scatter(n, slot_at, part[k]) for k in ("lp", "raw", "ent"))
    dev = lp.device
    scored = torch.zeros(n, dtype=torch.bool)
    if slot_at:
        scored[slot_at[0]] = True
    steps = len(st.block)
    step_of = _step_rows(t, t.block[gen], t.reveal_grid[gen])  # (generated slots,)

    def sums(v: torch.Tensor) -> torch.Tensor:  # (steps,) sum of v over the slots each step revealed
        return torch.zeros(steps, dtype=torch.float64, device=dev).index_add(0, step_of.to(dev), v[gen.to(dev)])

    n_revealed = torch.zeros(steps, dtype=torch.long).index_add(0, step_of, torch.ones_like(step_of))
    step_scored = torch.zeros(steps, dtype=torch.bool).index_put((step_of[scored[gen]],), torch.tensor(True))
    # Masked before a step: the block's generated slots revealed at that step or later.
    same = (t.block[None, :] == st.block[:, None]) & gen[None, :]  # (S, N)
    n_masked = (same & (t.reveal_grid[None, :] >= st.grid[:, None])).sum(dim=1)
    select = _selection(t, part, sampler, n_masked, n_revealed, dev)
    return TrajectoryScores(lp, raw, ent, scored, sums(lp), select, sums(ent) / n_revealed.to(dev), step_scored,
                            part["full"])


def _selection(t: Trajectory, part: dict, sampler: Sampler, n_masked: torch.Tensor, n_revealed: torch.Tensor, dev
               ) -> torch.Tensor:
    """Per step, log-prob of which positions were revealed (see `BlockRecorder.step`): the sampler's
    θ-free term from the counts and the grid levels, plus its terms at the slots each step left masked,
    NaN where the record says the sampler's terms do not describe the step."""
    st = t.steps
    steps = t.sampler.steps or t.block_size
    grid = st.grid.double()
    select = sampler.selection_log_prob(n_masked, n_revealed, 1 - grid / steps, 1 - (grid + 1) / steps).to(dev)
    if part["miss_idx"]:
        miss_idx = torch.cat(part["miss_idx"]).cpu()
        at = _step_rows(t, t.block[miss_idx], torch.cat(part["miss_grid"]))
        select = select.index_add(0, at.to(dev), torch.cat(part["miss"]))
    return torch.where(st.select_known.to(dev), select, torch.full_like(select, float("nan")))


def _pack(model: BD3LM, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]):
    """x_0 (B, n) right-padded, valid (B, n), and which positions hold the completion (B, n)."""
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts and {len(completions)} completions")
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    n = max(len(s) for s in seqs)
    if n > model.config.model_length:
        raise ValueError(f"a sequence of {n} tokens exceeds model_length {model.config.model_length}")
    x_0 = torch.zeros(len(seqs), n, dtype=torch.long)
    valid = torch.zeros(len(seqs), n, dtype=torch.bool)
    completion = torch.zeros(len(seqs), n, dtype=torch.bool)
    for j, (p, s) in enumerate(zip(prompts, seqs)):
        x_0[j, : len(s)] = torch.tensor(s)
        valid[j, : len(s)] = True
        completion[j, len(p) : len(s)] = True
    dev = model.device
    return x_0.to(dev), valid.to(dev), completion.to(dev)


def _masked_log_probs(model: BD3LM, x_t: torch.Tensor, x_0: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Raw log p_θ(x_0 | x_t) at every position (B, n), from one x_t ⊕ x_0 pass."""
    logits = model.forward_train(x_t, x_0, valid)
    return raw_log_probs(logits, model.config.mask_id).gather(-1, x_0[..., None]).squeeze(-1)


def mean_field_logprobs(model: BD3LM, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
                        ) -> list[torch.Tensor]:
    """One-pass mean-field log-probs (d1, wd1): every completion token masked, each block seeing the clean
    earlier blocks (prompt and completion) and its own fully masked slots (the prompt's tail stays clean).
    Returns per completion its token log-probs (raw: temperature 1, SUBS), with gradients."""
    x_0, valid, completion = _pack(model, prompts, completions)
    x_t = torch.where(completion, torch.full_like(x_0, model.config.mask_id), x_0)
    lp = _masked_log_probs(model, x_t, x_0, valid)
    return [lp[j][completion[j]] for j in range(len(prompts))]


def shared_noise_nelbo(models: Sequence[BD3LM], x_0: torch.Tensor, generators: Generators, *,
                       eligible: torch.Tensor | None = None, valid: torch.Tensor | None = None, samples: int = 1,
                       eps_min: float = 1e-3, eps_max: float = 1.0, antithetic: bool = True
                       ) -> tuple[list[torch.Tensor], NoiseDraw]:
    """Per-token NELBO terms (B, samples, L) of each model on one shared noise draw (the same t and masks
    for a policy and its reference: VRPO's antithetic pairing), and the draw. Arguments as `nelbo_samples`,
    whose terms each model's equal when it is given identically seeded generators."""
    cfg = models[0].config
    for m in models[1:]:
        if (m.config.block_size, m.config.mask_id) != (cfg.block_size, cfg.mask_id):
            raise ValueError("models with different block sizes or mask ids cannot share a noise draw")
    valid, eligible = scored_tokens(x_0, valid, eligible)
    draw = draw_noise(x_0, eligible, cfg.block_size, cfg.mask_id, generators, samples=samples,
                      eps_min=eps_min, eps_max=eps_max, antithetic=antithetic, lengths=valid.sum(1).tolist())
    x0_rep = x_0.repeat_interleave(samples, dim=0)
    valid_rep = valid.repeat_interleave(samples, dim=0)
    terms = [terms_from_logits(m.forward_train(draw.x_t, x0_rep, valid_rep), draw, x0_rep, cfg.mask_id)
             .view(x_0.shape[0], samples, -1) for m in models]
    return terms, draw


@dataclass
class CoupledScores:
    """Two complementary views of each completion (B, n): view A masks `mask_a`, view B the rest."""

    logprob_a: torch.Tensor  # raw log-probs where view A masks (0 elsewhere)
    logprob_b: torch.Tensor  # raw log-probs where view B masks (0 elsewhere)
    mask_a: torch.Tensor
    completion: torch.Tensor
    t: torch.Tensor  # each position's block level: view A masks with probability t
    weighted: torch.Tensor  # logprob_a / t where view A masks, logprob_b / (1 − t) where view B does


def coupled_logprobs(model: BD3LM, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     generators: Generators, *, t_min: float = 0.2, t_max: float = 0.8) -> CoupledScores:
    """Complementary-mask log-probs (coupled-GRPO): per (sequence, block) t ~ U(t_min, t_max), view A
    masks each completion token with probability t and view B masks exactly the others, so every token
    is scored once; one pass over both views. Each row draws from its own generator."""
    if not 0 < t_min <= t_max < 1:
        raise ValueError(f"need 0 < t_min <= t_max < 1, got {t_min}, {t_max}")
    x_0, valid, completion = _pack(model, prompts, completions)
    b, n = x_0.shape
    size = model.config.block_size
    mask_id = model.config.mask_id
    t = torch.full((b, n), 0.5, dtype=torch.float64)  # padding keeps a harmless level
    u = torch.ones(b, n, dtype=torch.float64)
    for j, (gen, m) in enumerate(zip(per_row(generators, b), valid.sum(1).tolist())):
        # a row draws for its own length only, so its masks do not depend on the batch
        levels = t_min + (t_max - t_min) * torch.rand(-(-m // size), generator=gen, dtype=torch.float64)
        t[j, :m] = levels.repeat_interleave(size)[:m]
        u[j, :m] = torch.rand(m, generator=gen, dtype=torch.float64)
    t = t.to(x_0.device)
    u = u.to(x_0.device)
    mask_a = completion & (u < t)
    mask_b = completion & ~mask_a
    views = torch.cat((torch.where(mask_a, mask_id, x_0), torch.where(mask_b, mask_id, x_0)))  # (2B, n)
    lp = _masked_log_probs(model, views, x_0.repeat(2, 1), valid.repeat(2, 1))
    lp_a = torch.where(mask_a, lp[:b], 0.0)
    lp_b = torch.where(mask_b, lp[b:], 0.0)
    weighted = lp_a / t + lp_b / (1 - t)
    return CoupledScores(lp_a, lp_b, mask_a, completion, t, weighted)
