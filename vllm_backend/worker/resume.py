"""Requests that resume from a partly revealed block (`vllm_xargs.resume_block`), e.g. EGSPO's greedy
one-step completions x̂₀ from a recorded state (block b at pass p).

The request's prompt is the sequence before block b plus, when b holds the prompt's tail, that tail; its
first block step starts from the given slots (the mask id where the state is still masked) instead of all
masks. With `algorithm: threshold`, temperature 0 and a threshold at most 1/V, every masked slot of a block
is filled by its argmax in one pass: block b's state, then each later block from all masks, to EOS or the
length limit, as `bd3_plugin.sampling.generate.greedy_completions` does in the core.
"""
from __future__ import annotations

import torch

from vllm_backend.worker.params import RESUME_KEY


class Resumes:
    """Which requests have had their first block step (a resumed block applies to that step only)."""

    def __init__(self) -> None:
        self.started: set[str] = set()

    def apply(self, block: torch.Tensor, rows, placeholder: torch.Tensor, requests) -> None:
        """Write each resuming request's state into its placeholder slots of `block` (B, L')."""
        for r, (rid, *_rest) in enumerate(rows):
            state = (requests[rid].sampling_params.extra_args or {}).get(RESUME_KEY)
            if state is None or rid in self.started:
                continue
            self.started.add(rid)
            given = torch.tensor(state, dtype=block.dtype, device=block.device)
            block[r] = torch.where(placeholder[r], given, block[r])

    def finish(self, finished_req_ids) -> None:
        self.started.difference_update(finished_req_ids)
