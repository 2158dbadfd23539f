"""The worst block step, run inside vLLM's profiling pass so that the KV cache is sized with its memory
reserved. vLLM sizes the KV cache from the peak of `profile_run` (`_dummy_run`, then `_dummy_sampler_run`);
a block step's full-vocabulary float32 logits and the sampler's float64 chunk are not in vLLM's own sampler
run, so the runner adds one step over the most blocks a step can decode, at the setting that holds the most
memory per slot (README, "Memory of a block step": 4 · slots · V + 33 · m · V bytes, m the slots of one
chunk of the samplers' CHUNK_ENTRIES)."""
from __future__ import annotations

import torch

from bd3_plugin.sampling import SamplerConfig
from bd3_plugin.sampling.registry import sampler_for

# Every masked slot read (threshold), temperature > 0, top-p: c' = 33, the largest in the README's table.
WORST = SamplerConfig(algorithm="threshold", temperature=1.0, top_p=0.9)


def block_step_rows(max_num_seqs: int, max_num_batched_tokens: int, block_size: int) -> int:
    """The most blocks one engine step decodes: one per request, each taking L' tokens of the step's budget."""
    return min(max_num_seqs, max_num_batched_tokens // block_size)


def worst_block_step(compute_logits, width: int, dtype: torch.dtype, device: torch.device, rows: int,
                     block_size: int, mask_id: int) -> None:
    """One step of the WORST sampler over `rows` all-mask blocks, on float32 logits from the output layer
    `compute_logits` ((k, width) hidden states -> (k, V)) at every slot, as a pass over those blocks gives
    them; the step's tokens are thrown away. Generators are on `device`, as the runner's are."""
    states = torch.rand(rows * block_size, width, dtype=dtype, device=device)  # (B·L', D)
    logits = compute_logits(states).view(rows, block_size, -1)  # (B, L', V)
    del states
    masked = torch.ones(rows, block_size, dtype=torch.bool, device=device)
    generators = [torch.Generator(device).manual_seed(r) for r in range(rows)]
    sampler_for(WORST, mask_id).step(logits, masked, masked, generators, block_size - 1, 1 / block_size, 0.0)
