"""Batched block-diffusion generation over the KV cache (spec §4).

Blocks are decoded left to right. A prompt's tail (len % L' tokens) sits clean at the start of the first
noisy block; its whole blocks are stored in the cache by that block's first denoising pass. Inside a block
the chosen sampler reveals tokens until none is masked; the clean block is stored by the next block's
first pass (`BlockBatch`), so a block costs its denoising passes and nothing more, and a row that ends is
never stored.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bd3_plugin.sampling.block_batch import BlockBatch
from bd3_plugin.sampling.config import SamplerConfig
from bd3_plugin.sampling.denoise import denoise_block
from bd3_plugin.core.model import BD3LM
from bd3_plugin.core.generators import Generators, per_row, seeded_generators
from bd3_plugin.sampling.trajectory import BlockRecorder, Trajectory, TrajectoryBuilder

@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)  # generated tokens, prompt excluded, EOS excluded
    reveal_steps: list[int] = field(default_factory=list)  # per token: this row's denoising step (1-based)
    finish_reason: str = "length"  # "length" | "eos" | "entropy"
    denoise_steps: int = 0  # denoising forward passes this row took part in while it had masks


@dataclass
class GenerateOutput:
    generations: list[Generation]
    denoise_passes: int  # batched forward passes over noisy blocks (each also stores the clean blocks before it)
    commit_passes: int  # passes that only stored clean blocks: the head of a prompt longer than the window
    trajectories: list[Trajectory] | None = None  # per row, with `record=True`

    @property
    def forward_passes(self) -> int:
        return self.denoise_passes + self.commit_passes


def unigram_entropy(tokens: Sequence[int]) -> float:
    counts = Counter(tokens)
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in counts.values())


def draw_seeds(n: int) -> list[int]:
    """Fresh seeds from the operating system, for rows that were given no generator."""
    rng = random.SystemRandom()
    return [rng.getrandbits(63) for _ in range(n)]


def _builders(prompts, generators: Generators | None, model: BD3LM, config: SamplerConfig
              ) -> list[TrajectoryBuilder]:
    """One trajectory builder per row, with the row's seed and whether that seed alone replays it."""
    if generators is None:
        seeds = draw_seeds(len(prompts))
        drawn = True
        replays = [True] * len(prompts)
    else:
        gens = per_row(generators, len(prompts))
        seeds = [g.initial_seed() for g in gens]
        drawn = False
        shared = len({id(g) for g in gens}) < len(gens)
        replays = [not shared and torch.equal(g.get_state(), torch.Generator(g.device).manual_seed(sd).get_state())
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
    if generators is None:  # drawn on the model's device, as the vLLM runner draws a request's
        seeds = [b.seed for b in builders] if record else draw_seeds(len(prompts))
        generators = seeded_generators(seeds, model.device)
    if not prompts:
        return GenerateOutput([], 0, 0, [] if record else None)
    cfg = model.config
    for p in prompts:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size or t == cfg.mask_id]
        if bad:
            raise ValueError(f"prompt token {bad[0]} is outside the vocabulary or is the mask id")
    batch = BlockBatch(model, prompts, per_row(generators, len(prompts)))
    out = [Generation() for _ in prompts]
    row_commits = [int(c) for c in batch.commit_overflow()]
    commits = max(row_commits, default=0)
    denoise = 0
    while batch.rows:
        recorder = BlockRecorder(config, batch.mask_id) if record else None
        done = denoise_block(batch.block, batch.forward, config, batch.generators, batch.mask_id,
                             recorder=recorder)
        assert batch.pending is None, "every block starts with a mask, so its first pass stored the clean blocks"
        denoise += done.passes
        before = torch.tensor([out[r].denoise_steps for r in batch.rows], device=done.row_steps.device)
        reveal_step = torch.where(done.reveal_step > 0, done.reveal_step + before[:, None], 0)
        if record:
            _record_block(builders, recorder.finish(), batch, out)
        for r, orig in enumerate(batch.rows):
            out[orig].denoise_steps += int(done.row_steps[r])
        batch.keep(_collect(batch, reveal_step, prompts, config, out, eos_id))
        batch.next_block()
    trajectories = [b.build(len(g.tokens), g.finish_reason, g.denoise_steps, c)
                    for b, g, c in zip(builders, out, row_commits)] if record else None
    return GenerateOutput(out, denoise, commits, trajectories)


def _record_block(builders: list[TrajectoryBuilder], record, batch: BlockBatch, out: list[Generation]) -> None:
    """Hand each live row's part of the block just denoised to its builder (before the row's step count
    moves on)."""
    for r, orig in enumerate(batch.rows):
        builders[orig].add_block(record, r, batch.block[r], out[orig].denoise_steps)


def _collect(batch: BlockBatch, reveal_step: torch.Tensor, prompts, config: SamplerConfig, out: list[Generation],
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
            new = new[:cut]
            steps = steps[:cut]
        g.tokens += new
        g.reveal_steps += steps
        n = len(g.tokens)
        cap = config.max_new_tokens
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
