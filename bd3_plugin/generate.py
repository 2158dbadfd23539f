"""Batched block-diffusion generation over the KV cache (spec §4).

Blocks are decoded left to right. A prompt's whole blocks are committed to the cache first; its tail
(len % L' tokens) sits clean at the start of the first noisy block. Rows with shorter prompts are
left-padded by whole blocks, so every row's blocks line up and one forward serves the batch. Inside a
block the chosen sampler reveals tokens until none is masked; then one commit pass stores the clean block.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .model import BD3LM
from .noise import Generators, per_row, seeded_generators
from .denoise import denoise_block
from .trajectory import BlockRecorder, Trajectory, TrajectoryBuilder

ALGORITHMS = ("first_hitting", "ddpm", "threshold")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplerConfig:
    algorithm: str = "first_hitting"
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # keep the k most probable tokens before the nucleus; 0 is off
    steps: int | None = None  # DDPM: grid points per block (default: the block size)
    threshold: float = 0.9  # threshold sampler: reveal every token at least this probable
    stop_at_eos: bool = True
    entropy_stop: float | None = None  # stop a row whose last `entropy_window` tokens fall below this (nats)
    entropy_window: int = 256

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 is off), got {self.top_k!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or isinstance(self.steps, bool)
                                       or self.steps < 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not _number(self.threshold) or not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold!r}")
        if self.entropy_window < 1:
            raise ValueError(f"entropy_window must be positive, got {self.entropy_window!r}")


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)  # generated tokens, prompt excluded, EOS excluded
    reveal_steps: list[int] = field(default_factory=list)  # per token: this row's denoising step (1-based)
    finish_reason: str = "length"  # "length" | "eos" | "entropy"
    denoise_steps: int = 0  # denoising forward passes this row took part in while it had masks


@dataclass
class GenerateOutput:
    generations: list[Generation]
    denoise_passes: int  # batched forward passes over noisy blocks
    commit_passes: int  # batched forward passes that stored clean blocks (prompt prefill included)
    trajectories: list[Trajectory] | None = None  # per row, with `record=True`

    @property
    def forward_passes(self) -> int:
        return self.denoise_passes + self.commit_passes


def unigram_entropy(tokens: Sequence[int]) -> float:
    counts = Counter(tokens)
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in counts.values())


class _Batch:
    """The rows still decoding: their current block, positions and bookkeeping."""

    def __init__(self, model: BD3LM, prompts: Sequence[Sequence[int]], generators: list[torch.Generator]):
        cfg, dev = model.config, model.device
        self.size, self.mask_id = cfg.block_size, cfg.mask_id
        whole = [len(p) // self.size for p in prompts]
        self.rows = list(range(len(prompts)))  # original index of each live row
        self.generators = generators
        self.cache = model.new_cache(len(prompts))
        self.block = torch.full((len(prompts), self.size), self.mask_id, dtype=torch.long, device=dev)
        self.start = torch.tensor([w * self.size for w in whole], device=dev)  # block's first position
        self.first_gen = [len(p) - w * self.size for p, w in zip(prompts, whole)]  # tail length
        for r, (p, w) in enumerate(zip(prompts, whole)):
            self.block[r, : self.first_gen[r]] = torch.tensor(p[w * self.size :], dtype=torch.long)
        self.prefill = self._prefill_inputs(prompts, whole, dev)

    def _prefill_inputs(self, prompts, whole, dev):
        n = max(whole) * self.size
        if n == 0:
            return None
        ids = torch.full((len(prompts), n), self.mask_id, dtype=torch.long, device=dev)
        valid = torch.zeros(len(prompts), n, dtype=torch.bool, device=dev)
        positions = torch.zeros(len(prompts), n, dtype=torch.long, device=dev)
        for r, (p, w) in enumerate(zip(prompts, whole)):
            pad = n - w * self.size
            ids[r, pad:] = torch.tensor(p[: w * self.size], dtype=torch.long)
            valid[r, pad:] = True
            positions[r, pad:] = torch.arange(w * self.size, device=dev)
        return ids, positions, valid

    def positions(self) -> torch.Tensor:
        return self.start[:, None] + torch.arange(self.size, device=self.start.device)  # (B, L')

    def keep(self, live: list[int]) -> None:
        if len(live) == len(self.rows):
            return
        idx = torch.tensor(live, dtype=torch.long, device=self.block.device)
        self.rows = [self.rows[i] for i in live]
        self.generators = [self.generators[i] for i in live]
        self.cache.select_rows(idx)
        self.block, self.start = self.block[idx], self.start[idx]
        self.first_gen = [self.first_gen[i] for i in live]


def draw_seeds(n: int) -> list[int]:
    """Fresh seeds from the operating system, for rows that were given no generator."""
    rng = random.SystemRandom()
    return [rng.getrandbits(63) for _ in range(n)]


def _builders(prompts, generators: Generators | None, model: BD3LM, config: SamplerConfig
              ) -> list[TrajectoryBuilder]:
    """One trajectory builder per row, with the row's seed and whether that seed alone replays it."""
    if generators is None:
        seeds, drawn, replays = draw_seeds(len(prompts)), True, [True] * len(prompts)
    else:
        gens = per_row(generators, len(prompts))
        seeds, drawn = [g.initial_seed() for g in gens], False
        shared = len({id(g) for g in gens}) < len(gens)
        replays = [not shared and torch.equal(g.get_state(), torch.Generator().manual_seed(sd).get_state())
                   for g, sd in zip(gens, seeds)]
    cfg = model.config
    return [TrajectoryBuilder(p, cfg.block_size, cfg.mask_id, config, sd, drawn, rp)
            for p, sd, rp in zip(prompts, seeds, replays)]


@torch.no_grad()
def generate(model: BD3LM, prompts: Sequence[Sequence[int]], config: SamplerConfig,
             generators: Generators | None = None, eos_id: int | None = None, *,
             record: bool = False) -> GenerateOutput:
    """Generate a continuation of every prompt (lists of token ids). One generator per row makes each
    row's result independent of the batch; a single generator is shared in row order. Without
    generators each row gets a freshly drawn seed; at temperature 0 no generator is drawn from.
    `record=True` returns each row's `Trajectory` too (the tokens are the same either way)."""
    builders = _builders(prompts, generators, model, config) if record else None
    if generators is None:
        generators = seeded_generators([b.seed for b in builders] if record else draw_seeds(len(prompts)))
    if not prompts:
        return GenerateOutput([], 0, 0, [] if record else None)
    cfg = model.config
    for p in prompts:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size or t == cfg.mask_id]
        if bad:
            raise ValueError(f"prompt token {bad[0]} is outside the vocabulary or is the mask id")
    batch = _Batch(model, prompts, per_row(generators, len(prompts)))
    out = [Generation() for _ in prompts]
    commits, row_commits = 0, [int(len(p) >= batch.size) for p in prompts]
    if batch.prefill is not None:
        ids, positions, valid = batch.prefill
        model.commit(ids, positions, batch.cache, valid)
        commits += 1
    denoise = 0
    while batch.rows:
        positions = batch.positions()
        recorder = BlockRecorder(config, batch.mask_id) if record else None
        done = denoise_block(batch.block, lambda blk: model.denoise(blk, positions, batch.cache), config,
                             batch.generators, batch.mask_id, recorder=recorder)
        denoise += done.passes
        before = torch.tensor([out[r].denoise_steps for r in batch.rows], device=done.row_steps.device)
        reveal_step = torch.where(done.reveal_step > 0, done.reveal_step + before[:, None], 0)
        if record:
            _record_block(builders, recorder.finish(), batch, out)
        for r, orig in enumerate(batch.rows):
            out[orig].denoise_steps += int(done.row_steps[r])
        live = _collect(batch, reveal_step, prompts, config, out, eos_id)
        batch.keep(live)
        if not batch.rows:
            break
        model.commit(batch.block, batch.positions(), batch.cache)
        commits += 1
        for orig in batch.rows:
            row_commits[orig] += 1
        batch.start = batch.start + batch.size
        batch.block.fill_(batch.mask_id)
        batch.first_gen = [0] * len(batch.rows)
    trajectories = [b.build(len(g.tokens), g.finish_reason, g.denoise_steps, c)
                    for b, g, c in zip(builders, out, row_commits)] if record else None
    return GenerateOutput(out, denoise, commits, trajectories)


def _record_block(builders: list[TrajectoryBuilder], record, batch: _Batch, out: list[Generation]) -> None:
    """Hand each live row's part of the block just denoised to its builder (before the row's step count
    moves on)."""
    for r, orig in enumerate(batch.rows):
        builders[orig].add_block(record, r, batch.block[r], out[orig].denoise_steps)


def _collect(batch: _Batch, reveal_step: torch.Tensor, prompts, config: SamplerConfig, out: list[Generation],
             eos_id: int | None) -> list[int]:
    """Append the finished block to each row's output; returns the rows that go on."""
    live = []
    for r, orig in enumerate(batch.rows):
        g = out[orig]
        new = batch.block[r, batch.first_gen[r] :].tolist()
        steps = reveal_step[r, batch.first_gen[r] :].tolist()
        hit_eos = config.stop_at_eos and eos_id is not None and eos_id in new
        if hit_eos:
            cut = new.index(eos_id)
            new, steps = new[:cut], steps[:cut]
        g.tokens += new
        g.reveal_steps += steps
        n, cap = len(g.tokens), config.max_new_tokens
        if n > cap or (n == cap and not hit_eos):
            del g.tokens[cap:], g.reveal_steps[cap:]
            g.finish_reason = "length"
        elif hit_eos:
            g.finish_reason = "eos"
        elif config.entropy_stop is not None and _degenerate(list(prompts[orig]) + g.tokens, config):
            g.finish_reason = "entropy"
        else:
            live.append(r)
    return live


def _degenerate(history: list[int], config: SamplerConfig) -> bool:
    window = config.entropy_window
    return len(history) >= window and unigram_entropy(history[-window:]) < config.entropy_stop


@torch.no_grad()
def greedy_completions(model: BD3LM, states: Sequence[tuple[Trajectory, int, int]], eos_id: int | None = None,
                       max_new_tokens: int | None = None) -> list[list[int]]:
    """One-step greedy completions (EGSPO's x̂₀) from recorded states (trajectory, block b, pass p): block
    b as it stood at pass p has its masked slots filled by argmax in one pass, then each later block is
    filled from all masks in one pass, until EOS (not returned) or the length limit (default: the
    rollout's `max_new_tokens`). Returns each state's output tokens, the prompt excluded."""
    if not states:
        return []
    size, mask_id = model.config.block_size, model.config.mask_id
    prefixes, blocks, out, first_gen, limits = [], [], [], [], []
    for traj, b, p in states:
        blocks.append(traj.state(b, p))  # checks that block b was denoised
        prefixes.append(traj.sequence()[: b * size].tolist())
        before = (b - traj.first_block) * size  # slots of the denoised blocks before b, all in the output
        out.append(traj.tokens[:before][traj.reveal_pass[:before] > 0].tolist())
        first_gen.append(len(traj.prompt) % size if b == traj.first_block else 0)
        limits.append(max_new_tokens or traj.sampler.max_new_tokens)
    batch = _Batch(model, prefixes, [None] * len(states))
    if batch.prefill is not None:
        ids, positions, valid = batch.prefill
        model.commit(ids, positions, batch.cache, valid)
    batch.block, batch.first_gen = torch.stack(blocks).to(model.device), first_gen
    while batch.rows:
        logits = model.denoise(batch.block, batch.positions(), batch.cache)  # (B, L', V)
        logits[..., mask_id] = -float("inf")  # SUBS: the mask is never predicted
        batch.block = torch.where(batch.block == mask_id, logits.argmax(dim=-1), batch.block)
        live = []
        for r, orig in enumerate(batch.rows):
            new = batch.block[r, batch.first_gen[r] :].tolist()
            done = eos_id is not None and eos_id in new
            out[orig] += new[: new.index(eos_id)] if done else new
            if done or len(out[orig]) >= limits[orig]:
                del out[orig][limits[orig] :]
            else:
                live.append(r)
        batch.keep(live)
        if not batch.rows:
            break
        model.commit(batch.block, batch.positions(), batch.cache)
        batch.start = batch.start + size
        batch.block = torch.full_like(batch.block, mask_id)
        batch.first_gen = [0] * len(batch.rows)
    return out
