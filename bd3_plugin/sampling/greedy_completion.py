"""One-step greedy completions (EGSPO's x̂₀) of recorded rollout states, batched over one KV cache."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from bd3_plugin.sampling.block_batch import BlockBatch
from bd3_plugin.core.model import BD3LM
from bd3_plugin.sampling.trajectory import Trajectory


@torch.no_grad()
def greedy_completions(model: BD3LM, states: Sequence[tuple[Trajectory, int, int]], eos_id: int | None = None,
                       max_new_tokens: int | None = None) -> list[list[int]]:
    """One-step greedy completions (EGSPO's x̂₀) from recorded states (trajectory, block b, pass p): block
    b as it stood at pass p has its masked slots filled by argmax in one pass, then each later block is
    filled from all masks in one pass, until EOS (not returned) or the length limit (default: the
    rollout's `max_new_tokens`). Returns each state's output tokens, the prompt excluded. Each pass also
    stores the clean blocks before its block (`BlockBatch.forward`), so a block costs exactly one pass."""
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
    batch = BlockBatch(model, prefixes, [None] * len(states))
    batch.commit_overflow()
    batch.block, batch.first_gen = torch.stack(blocks).to(model.device), first_gen
    while batch.rows:
        masked = batch.block == mask_id
        logits = batch.forward(batch.block, masked)  # (B, L', V), valid at the masked slots
        logits[..., mask_id] = -float("inf")  # SUBS: the mask is never predicted
        batch.block = torch.where(masked, logits.argmax(dim=-1), batch.block)
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
        batch.next_block()
    return out
