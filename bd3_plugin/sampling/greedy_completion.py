"""One-step greedy completions (EGSPO's x̂₀) of recorded rollout states, batched over one KV cache."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bd3_plugin.sampling.block_batch import BlockBatch
from bd3_plugin.core.model import BD3LM
from bd3_plugin.core.subs import subs_logits
from bd3_plugin.sampling.trajectory import Trajectory


@dataclass(frozen=True, eq=False)
class CompletionStart:
    """Where a greedy completion from a recorded state (trajectory, block b, pass p) starts; the core and the
    vLLM engine (`vllm_backend.server.traces.greedy_completions`) both begin here."""

    prefix: list[int]  # the sequence before block b
    block: torch.Tensor  # (L',) block b as it stood at pass p
    prompt_tail: list[int]  # the prompt's tokens inside block b (only when b is the first denoised block)
    head: list[int]  # output tokens of the denoised blocks before b
    limit: int  # output tokens at most


def completion_start(traj: Trajectory, b: int, p: int, max_new_tokens: int | None = None) -> CompletionStart:
    size = traj.block_size
    block = traj.state(b, p)  # checks that block b was denoised
    before = (b - traj.first_block) * size  # slots of the denoised blocks before b, all in the output
    return CompletionStart(prefix=traj.sequence()[: b * size].tolist(), block=block,
                           prompt_tail=list(traj.prompt[b * size :]) if b == traj.first_block else [],
                           head=traj.tokens[:before][traj.reveal_pass[:before] > 0].tolist(),
                           limit=max_new_tokens or traj.sampler.max_new_tokens)


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
    mask_id = model.config.mask_id
    starts = [completion_start(traj, b, p, max_new_tokens) for traj, b, p in states]
    out = [list(s.head) for s in starts]
    limits = [s.limit for s in starts]
    batch = BlockBatch(model, [s.prefix for s in starts], [None] * len(states))
    batch.commit_overflow()
    batch.block = torch.stack([s.block for s in starts]).to(model.device)
    batch.first_gen = [len(s.prompt_tail) for s in starts]
    while batch.rows:
        masked = batch.block == mask_id
        logits = subs_logits(batch.forward(batch.block, masked), mask_id)  # (B, L', V), valid at the masked slots
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
