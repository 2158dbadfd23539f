"""Denoise one block of a batch to completion with any of the samplers.

The loop is shared by every engine that runs BD3 sampling: the core's `generate` calls it with a forward
over its own KV cache, the vLLM backend with a pass through vLLM's model on the paged cache.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .sampling import ddpm_step, first_hitting_step, threshold_step


@dataclass
class BlockOutcome:
    passes: int  # forward passes over the batch
    row_steps: torch.Tensor  # (B,) passes in which each row still had masks and needed fresh logits
    reveal_step: torch.Tensor  # (B, L') the row's step (1-based, within the block) that revealed it; 0 if given


def denoise_block(block: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor], config,
                  generators: list[torch.Generator], mask_id: int, *, recorder=None) -> BlockOutcome:
    """Reveal every mask of `block` (B, L') in place. `forward(block)` returns logits (B, L', V);
    `config` is a SamplerConfig (algorithm, temperature, top_p, top_k, steps, threshold). A `recorder`
    (`trajectory.BlockRecorder`) is shown every step; it draws nothing, so tokens are the same with it."""
    kw = dict(mask_id=mask_id, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
              with_probs=recorder is not None)
    steps = config.steps or block.shape[1]
    passes, grid_i, logits = 0, 0, None
    # DDPM caching: the network ignores t, so a row's logits change only when its block does.
    stale = torch.ones(block.shape[0], dtype=torch.bool, device=block.device)
    row_steps = torch.zeros(block.shape[0], dtype=torch.long, device=block.device)
    reveal_step = torch.zeros_like(block)
    if recorder is not None:
        recorder.begin(block)
    while True:
        masked = block == mask_id
        if not masked.any():
            break
        needs = masked.any(dim=1) & stale
        if needs.any():
            logits = forward(block)
            passes += 1
            row_steps += needs.long()
        t, s = 1 - grid_i / steps, 1 - (grid_i + 1) / steps
        if config.algorithm == "first_hitting":
            reveal, tokens, *probs = first_hitting_step(logits, masked, generators, **kw)
        elif config.algorithm == "threshold":
            reveal, tokens, *probs = threshold_step(logits, masked, generators, threshold=config.threshold, **kw)
        else:
            reveal, tokens, *probs = ddpm_step(logits, masked, generators, t=t, s=s, **kw)
            stale = reveal.any(dim=1)
        if recorder is not None:
            recorder.step(logits, masked, reveal, tokens, row_steps, grid_i, t, s, *probs)
        grid_i += 1
        block[reveal] = tokens[reveal]
        reveal_step[reveal] = row_steps[:, None].expand_as(reveal)[reveal]
    return BlockOutcome(passes, row_steps, reveal_step)
