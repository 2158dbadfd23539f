"""Denoise one block of a batch to completion with any of the samplers.

The loop is shared by every engine that runs BD3 sampling: the core's `generate` calls it with a forward
over its own KV cache, the vLLM backend with a pass through vLLM's model on the paged cache. Each step is
split around the pass: the sampler's `read` (before) says where the step will read logits, so that the
engine computes the output layer only there; its `step` (after) reveals tokens from those logits.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bd3_plugin.sampling.registry import sampler_for


@dataclass
class BlockOutcome:
    passes: int  # forward passes over the batch
    row_steps: torch.Tensor  # (B,) passes in which each row still had masks and needed fresh logits
    reveal_step: torch.Tensor  # (B, L') the row's step (1-based, within the block) that revealed it; 0 if given


def denoise_block(block: torch.Tensor, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], config,
                  generators: list[torch.Generator], mask_id: int, *, recorder=None) -> BlockOutcome:
    """Reveal every mask of `block` (B, L') in place. `forward(block, read)` runs one pass and returns
    logits (B, L', V) that need be valid only at the `read` (B, L') slots (the others may be zeros; a row
    with no read slot needs no logits at all); `config` is a SamplerConfig (algorithm, temperature, top_p,
    top_k, steps, threshold). A `recorder` (`trajectory.BlockRecorder`) is shown every step and reads only
    the slots read; it draws nothing, so tokens are the same with it. First-hitting draws its position in
    `read`, before the pass and before the token, as it would drawing both after the pass."""
    sampler = sampler_for(config, mask_id)
    steps = config.steps or block.shape[1]
    passes = 0
    grid_i = 0
    logits = None
    # Caching (DDPM): the network ignores t, so a row's logits change only when its block does; a cached
    # row's masked slots are a subset of those read when its logits were computed (nothing is re-masked).
    stale = torch.ones(block.shape[0], dtype=torch.bool, device=block.device)
    row_steps = torch.zeros(block.shape[0], dtype=torch.long, device=block.device)
    reveal_step = torch.zeros_like(block)
    if recorder is not None:
        recorder.begin(block)
    while True:
        masked = block == mask_id
        live = masked.any(dim=1)  # (B,) rows with masks
        needs = live & stale
        cached = live & ~needs  # (B,) rows that keep their last logits
        # The loop's three decisions in one read of the device (each read waits for the device on CUDA).
        any_masked, any_needs, any_cached = torch.stack((live.any(), needs.any(), cached.any())).tolist()
        if not any_masked:
            break
        read = sampler.read(masked, generators)
        if any_needs:
            fresh = forward(block, read & needs[:, None])
            if any_cached:
                fresh[cached] = logits[cached]
            logits = fresh
            passes += 1
            row_steps += needs.long()
        t = 1 - grid_i / steps
        s = 1 - (grid_i + 1) / steps
        result = sampler.step(logits, masked, read, generators, grid_i, t, s, with_probs=recorder is not None)
        reveal = result.reveal
        if sampler.keeps_logits:
            stale = reveal.any(dim=1)
        if recorder is not None:
            recorder.step(logits, masked, result, row_steps, grid_i, t, s)
        grid_i += 1
        # Written with where, not boolean indexing: the same values, and no wait for the device on CUDA.
        block.copy_(torch.where(reveal, result.tokens, block))
        reveal_step.copy_(torch.where(reveal, row_steps[:, None], reveal_step))
    return BlockOutcome(passes, row_steps, reveal_step)
