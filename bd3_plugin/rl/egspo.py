"""Entropy-guided stepwise policy optimisation (EGSPO-style) for block-diffusion LMs.

One iteration: G rollouts per prompt with their trajectories; a reward per document; in every rollout the K
steps whose revealed tokens had the highest mean entropy; for each chosen step the greedy one-step
completions x̂₀ from the state before and after it; stepwise advantages

    A_t = (R(x₀) − mean of R over the prompt's group) + λ · (R(x̂₀ after t) − R(x̂₀ before t)),

scaled by their standard deviation over the batch; a PPO-clipped surrogate on the importance ratio
exp(log π_θ(step) − log π_rollout(step)) of the chosen steps (their token log-probs recomputed by
`score_trajectory`), plus β · the exact KL over the vocabulary from the starting weights at the same
positions; an optimiser step; the rollout engine gets the new weights.

The first-hitting selection term (−log n_masked) does not depend on θ, so only the token term is trained.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from bd3_plugin.sampling.greedy_completion import greedy_completions
from bd3_plugin.core.model import BD3LM
from bd3_plugin.sampling.trajectory import Trajectory
from bd3_plugin.rl.trajectory_scoring import score_trajectory

Step = tuple[int, int]  # (block, pass)


class Reward(Protocol):
    def __call__(self, prompt: Sequence[int], completion: list[int], finished: bool) -> float:
        """The reward of a completion; 0 for one that did not finish is the usual choice."""

    def viable(self, prompt: Sequence[int], tokens: list[int]) -> bool:
        """Whether an unfinished completion that begins with `tokens` can still earn a non-zero reward."""


@dataclass(frozen=True)
class RLConfig:
    """Defaults are the recorded run's (docs/RL.md, K3): they hold the documents' length."""

    prompts: int = 4  # prompts per iteration
    group: int = 8  # G: rollouts per prompt
    steps_per_rollout: int = 8  # K: entropy-selected steps trained per rollout
    step_weight: float = 0.0  # λ: weight of the greedy one-step reward difference
    lr: float = 3e-4
    kl_weight: float = 0.05  # β
    clip_low: float = 0.2  # ratios are clipped to [1 − clip_low, 1 + clip_high]
    clip_high: float = 0.5
    inner_steps: int = 1  # optimiser steps per rollout batch (ratios leave 1 from the second on)
    grad_clip: float = 1.0
    chunk: int = 8  # trajectories scored per replay (sorted by length, so padding stays short)
    anchor_weight: float = 0.5  # weight of the anchor loss (e.g. the NELBO of source documents), if given

    def __post_init__(self) -> None:
        for name in ("prompts", "group", "steps_per_rollout", "inner_steps", "chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("step_weight", "kl_weight", "clip_low", "clip_high", "grad_clip", "anchor_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must lie in (0, 1), got {self.lr!r}")
        if self.clip_low >= 1:
            raise ValueError(f"clip_low must be < 1, got {self.clip_low!r}")


# ---- pure pieces -------------------------------------------------------------------------------------
def finished(traj: Trajectory) -> bool:
    """The rollout stopped at EOS: the core says "eos", vLLM's finish reason for it is "stop"."""
    return traj.finish_reason in ("eos", "stop")


def influential_steps(traj: Trajectory) -> torch.Tensor:
    """(S,) bool: the steps that can change the returned document, i.e. those not after the last step that
    revealed one of its tokens or the EOS that ended it. Tail slots revealed later (after the stop point,
    kept for an exact replay) condition nothing in the output."""
    kept = traj.in_output.clone()
    if finished(traj):
        generated = (traj.reveal_pass > 0).nonzero()[:, 0]
        after = generated[generated > kept.nonzero()[-1, 0]] if kept.any() else generated
        kept[after[0]] = True  # the EOS slot: the first generated slot after the output
    return traj.steps.step <= traj.reveal_step[kept].max()


def entropy_steps(traj: Trajectory, k: int) -> list[Step]:
    """The k influential steps of highest mean entropy of the revealed tokens (EGSPO's selection), as
    (block, pass)."""
    st = traj.steps
    live = ((st.n_revealed > 0) & influential_steps(traj)).nonzero()[:, 0]
    top = st.entropy_mean[live].topk(min(k, len(live))).indices
    return [(int(st.block[i]), int(st.pass_index[i])) for i in live[top].tolist()]


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """R − the mean of its group; rewards (B,) hold consecutive groups of `group` rollouts."""
    r = rewards.view(-1, group)  # (prompts, G)
    return (r - r.mean(dim=1, keepdim=True)).reshape(-1)


class LengthBaseline:
    """The expected reward of a document of a given length: a running mean per length bucket over the
    iterations so far. With it, R − b(length) has mean zero at every length, so the update has no reason
    to move the length distribution (validity is easier for short documents: a group baseline rewards
    shortening); what it rewards is being valid at one's own length."""

    def __init__(self, bucket: int = 4, decay: float = 0.8) -> None:
        if bucket < 1 or not 0 <= decay < 1:
            raise ValueError(f"need bucket >= 1 and 0 <= decay < 1, got {bucket}, {decay}")
        self.bucket = bucket
        self.decay = decay
        self.means = {}

    def __call__(self, rewards: torch.Tensor, lengths: list[int], stopped: list[bool] | None = None) -> torch.Tensor:
        """The baseline of each rollout (B,), from the iterations before this one where a bucket has been
        seen (else this batch's bucket mean); then this batch joins the running means. A rollout that did
        not stop (`stopped` False) is compared with the batch's mean instead: by length alone, never
        finishing would cost nothing."""
        if stopped is not None and not all(stopped):
            done = [i for i, x in enumerate(stopped) if x]
            base = torch.full_like(rewards, rewards.mean().item())
            if done:
                base[done] = self(rewards[done], [lengths[i] for i in done])
            return base
        keys = [n // self.bucket for n in lengths]
        now = {k: rewards[[i for i, x in enumerate(keys) if x == k]].mean().item() for k in set(keys)}
        base = torch.tensor([self.means.get(k, now[k]) for k in keys], dtype=rewards.dtype)
        for k, v in now.items():
            self.means[k] = self.decay * self.means[k] + (1 - self.decay) * v if k in self.means else v
        return base


def step_advantages(seq_adv: torch.Tensor, before: torch.Tensor, after: torch.Tensor, step_weight: float,
                    chosen: torch.Tensor) -> torch.Tensor:
    """(B, K) stepwise advantages: the sequence's group advantage plus λ·(R(x̂₀ after) − R(x̂₀ before)),
    divided by their standard deviation over the chosen steps of the batch (1 where it is 0)."""
    adv = seq_adv[:, None] + step_weight * (after - before)
    scale = adv[chosen].std() if chosen.sum() > 1 else torch.tensor(0.0)
    return adv / (scale if scale > 1e-8 else 1.0)


def clipped_surrogate(new_lp: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor, clip_low: float,
                      clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's −min(ρA, clip(ρ)A) per step and the ratios ρ = exp(new − old)."""
    ratio = (new_lp - old_lp).exp()
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    return -torch.minimum(ratio * adv, clipped * adv), ratio


def exact_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(π_θ ‖ π_ref) per row of full-vocabulary log-probs (n, V); the mask column (p = 0) adds 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - ref_logp), torch.zeros_like(p)).sum(dim=-1)


# ---- one iteration ------------------------------------------------------------------------------------
@dataclass
class Batch:
    """What the rollouts of one iteration give the update: B = prompts · G trajectories."""

    trajectories: list[Trajectory]
    rewards: torch.Tensor  # (B,)
    chosen: list[list[Step]]
    advantages: torch.Tensor  # (B, K) zero where a rollout has fewer than K steps
    old_logprob: torch.Tensor  # (B, K) the rollout's Σ log-prob of the tokens of each chosen step


def greedy_rewards(policy: BD3LM, states: list[tuple[Trajectory, int, int]], reward: Reward,
                   eos_id: int | None) -> list[float]:
    """R(x̂₀) for each state (trajectory, block, pass). Exact, but cheaper than completing every state to the
    length limit: each state is first completed through the block after its own; a completion that has not
    stopped there is finished to the rollout's limit only if `reward.viable(prompt, tokens)` says that its
    tokens so far can still begin a rewarded document (greedy decoding is deterministic, so the longer run
    starts with the same tokens)."""
    out = [0.0] * len(states)
    groups: dict[int, list[int]] = {}
    for i, (t, b, _) in enumerate(states):
        limit = min((b + 2) * t.block_size - len(t.prompt), t.sampler.max_new_tokens)
        groups.setdefault(limit, []).append(i)
    rest = []
    for limit, idx in groups.items():
        for i, tokens in zip(idx, greedy_completions(policy, [states[i] for i in idx], eos_id, limit)):
            t = states[i][0]
            if len(tokens) < limit or limit == t.sampler.max_new_tokens:  # stopped at EOS or at the limit
                out[i] = reward(t.prompt, tokens, len(tokens) < t.sampler.max_new_tokens)
            elif reward.viable(t.prompt, tokens):
                rest.append(i)
    for i, tokens in zip(rest, greedy_completions(policy, [states[i] for i in rest], eos_id)):
        t = states[i][0]
        out[i] = reward(t.prompt, tokens, len(tokens) < t.sampler.max_new_tokens)
    return out


def build_batch(policy: BD3LM, trajectories: list[Trajectory], reward: Reward, cfg: RLConfig,
                eos_id: int | None, baseline: LengthBaseline | None = None) -> Batch:
    """Rewards, entropy-guided steps, x̂₀ rewards before and after each step, advantages (the sequence
    term against the group mean, or against `baseline` by document length)."""
    k = cfg.steps_per_rollout
    rewards = torch.tensor([reward(t.prompt, t.output, finished(t)) for t in trajectories],
                           dtype=torch.float64)
    chosen = [entropy_steps(t, k) for t in trajectories]
    # State before step (b, p): slots revealed at pass >= p masked; after it: at pass >= p + 1.
    states = [(t, b, p + d) for t, steps in zip(trajectories, chosen) for b, p in steps for d in (0, 1)]
    # With λ = 0 the x̂₀ rewards do not enter the advantages: no greedy completions are run.
    hat_flat = iter(greedy_rewards(policy, states, reward, eos_id) if cfg.step_weight > 0 else [0.0] * len(states))
    hat = torch.zeros(len(trajectories), k, 2, dtype=torch.float64)
    mask = torch.zeros(len(trajectories), k, dtype=torch.bool)
    old = torch.zeros(len(trajectories), k, dtype=torch.float64)
    for j, (t, steps) in enumerate(zip(trajectories, chosen)):
        rows = _step_rows(t)
        for s, step in enumerate(steps):
            hat[j, s, 0] = next(hat_flat)
            hat[j, s, 1] = next(hat_flat)
            mask[j, s] = True
            old[j, s] = t.steps.logprob_tokens[rows[step]]
    if baseline is None:
        seq_adv = group_advantages(rewards, cfg.group)
    else:
        seq_adv = rewards - baseline(rewards, [len(t.prompt) + len(t.output) for t in trajectories],
                                     [finished(t) for t in trajectories])
    adv = step_advantages(seq_adv, hat[..., 0], hat[..., 1], cfg.step_weight, mask)
    return Batch(trajectories, rewards, chosen, torch.where(mask, adv, 0.0), old)


def _step_rows(t: Trajectory) -> dict[Step, int]:
    return {(int(b), int(p)): s for s, (b, p) in enumerate(zip(t.steps.block, t.steps.pass_index))}


@dataclass
class UpdateStats:
    loss: float
    kl: float | None  # mean exact KL per scored token (None without a KL term)
    ratio_mean: float
    clipped: float  # fraction of scored steps whose ratio was clipped
    max_logprob_gap: float  # before the first optimiser step: max |scored − recorded| step log-prob
    scored_steps: int  # chosen steps with a non-zero advantage (the others add no policy gradient)
    anchor: float  # the anchor loss (0 without one)
    seconds_scoring: float
    seconds_optimiser: float


def _scored_steps(batch: Batch) -> list[list[Step]]:
    """The chosen steps whose advantage is not 0: a zero advantage adds nothing to the surrogate's
    gradient, so those steps are not replayed (the KL is then estimated on the steps that are)."""
    return [[s for s, a in zip(steps, batch.advantages[j].tolist()) if a != 0]
            for j, steps in enumerate(batch.chosen)]


def _chunk_loss(policy: BD3LM, ref: BD3LM, batch: Batch, idx: list[int], steps: list[list[Step]],
                cfg: RLConfig, n_chosen: int, first: bool) -> tuple[torch.Tensor, dict]:
    """The surrogate and KL terms of the trajectories `idx` (their share of the batch mean)."""
    trajs = [batch.trajectories[j] for j in idx]
    with_kl = cfg.kl_weight > 0  # without it the reference replay is skipped
    ref_scores = [None] * len(idx)
    if with_kl:
        with torch.no_grad():
            ref_scores = score_trajectory(ref, trajs, steps=steps, full_vocab=steps)
    scores = score_trajectory(policy, trajs, steps=steps, full_vocab=steps if with_kl else None)
    loss = torch.zeros((), dtype=torch.float64)
    acc = dict(gap=0.0, kl=0.0, tokens=0, ratio=0.0, clipped=0)
    for j, t, sc, rs, st in zip(idx, trajs, scores, ref_scores, steps):
        rows = _step_rows(t)
        chosen = [batch.chosen[j].index(s) for s in st]  # columns of the batch's (B, K) arrays
        new_lp = sc.step_logprob_tokens[torch.tensor([rows[s] for s in st])]
        old_lp = batch.old_logprob[j, chosen]
        adv = batch.advantages[j, chosen]
        if first:
            acc["gap"] = max(acc["gap"], (new_lp.detach() - old_lp).abs().max().item())
        surrogate, ratio = clipped_surrogate(new_lp, old_lp, adv, cfg.clip_low, cfg.clip_high)
        loss = loss + surrogate.sum() / n_chosen
        if with_kl:
            kl = torch.cat([exact_kl(sc.full_logprobs[s], rs.full_logprobs[s]) for s in st])
            loss = loss + cfg.kl_weight * kl.sum() / n_chosen
        else:
            kl = torch.zeros(0)
        acc["kl"] += kl.sum().item()
        acc["tokens"] += len(kl)
        acc["ratio"] += ratio.sum().item()
        acc["clipped"] += ((ratio < 1 - cfg.clip_low) | (ratio > 1 + cfg.clip_high)).sum().item()
    return loss, acc


def update(policy: BD3LM, ref: BD3LM, optimizer: torch.optim.Optimizer, batch: Batch, cfg: RLConfig,
           anchor: Callable[[], torch.Tensor] | None = None) -> UpdateStats:
    """`cfg.inner_steps` optimiser steps on the batch; gradients accumulate chunk by chunk. `anchor()`, if
    given, returns a loss added with weight `cfg.anchor_weight` at every step."""
    steps = _scored_steps(batch)
    n_chosen = max(sum(len(c) for c in batch.chosen), 1)
    live = [j for j, st in enumerate(steps) if st]
    n_scored = sum(len(steps[j]) for j in live)
    scoring = 0.0
    optimising = 0.0
    for inner in range(cfg.inner_steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        tot = dict(gap=0.0, kl=0.0, tokens=0, ratio=0.0, clipped=0)
        order = sorted(live, key=lambda j: len(batch.trajectories[j].tokens))  # similar lengths share a replay
        for c in range(0, len(order), cfg.chunk):
            idx = order[c : c + cfg.chunk]
            loss, acc = _chunk_loss(policy, ref, batch, idx, [steps[j] for j in idx], cfg, n_chosen, inner == 0)
            loss.backward()
            loss_sum += loss.item()
            tot = {k: max(tot[k], v) if k == "gap" else tot[k] + v for k, v in acc.items()}
        gap = tot["gap"] if inner == 0 else gap
        anchor_loss = 0.0
        if anchor is not None and cfg.anchor_weight > 0:
            a = anchor()
            (cfg.anchor_weight * a).backward()
            anchor_loss = a.item()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        t2 = time.perf_counter()
        scoring += t1 - t0
        optimising += t2 - t1
    n = max(n_scored, 1)
    kl = tot["kl"] / tot["tokens"] if tot["tokens"] else None
    return UpdateStats(loss_sum + cfg.anchor_weight * anchor_loss, kl,
                       tot["ratio"] / n, tot["clipped"] / n, gap, n_scored, anchor_loss, scoring, optimising)
