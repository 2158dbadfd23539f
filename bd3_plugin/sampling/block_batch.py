"""The rows of a batch decoded block by block over one KV cache (spec §4), and the pass that serves them.

Rows with shorter prompts are left-padded by whole blocks, so every row's blocks line up in the cache and
one forward serves the batch. A prompt's whole blocks and each finished block are stored in the cache by
the next block's first denoising pass (`forward`): one pass over [clean blocks ; noisy block], not a
commit pass of its own. The clean blocks attend only to the cache and to each other, so their K/V are those
a separate commit pass would store, and the noisy block sees what it would see after that commit.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from bd3_plugin.core.model import BD3LM, Clean


class BlockBatch:
    """The rows still decoding: their current block, positions, pending clean blocks and bookkeeping."""

    def __init__(self, model: BD3LM, prompts: Sequence[Sequence[int]], generators: list[torch.Generator]):
        cfg = model.config
        dev = model.device
        self.model = model
        self.size = cfg.block_size
        self.mask_id = cfg.mask_id
        whole = [len(p) // self.size for p in prompts]
        self.rows = list(range(len(prompts)))  # original index of each live row
        self.generators = generators
        self.cache = model.new_cache(len(prompts))
        self.block = torch.full((len(prompts), self.size), self.mask_id, dtype=torch.long, device=dev)
        self.start = torch.tensor([w * self.size for w in whole], device=dev)  # block's first position
        self.first_gen = [len(p) - w * self.size for p, w in zip(prompts, whole)]  # tail length
        for r, (p, w) in enumerate(zip(prompts, whole)):
            self.block[r, : self.first_gen[r]] = torch.tensor(p[w * self.size :], dtype=torch.long)
        self.pending = self._prefill(prompts, whole, dev)  # clean blocks the next pass stores

    def _prefill(self, prompts, whole, dev) -> Clean | None:
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
        return Clean(ids, positions, valid)

    def commit_overflow(self) -> list[bool]:
        """Prompts longer than the cache window cannot share one pass with the first noisy block (each of
        their blocks must see its own window): commit all but their last whole block in a pass of its own.
        Returns, per row, whether that pass stored any of the row's tokens (no pass: all False)."""
        p = self.pending
        if p is None or p.ids.shape[1] <= self.cache.capacity:
            return [False] * len(self.rows)
        head = p.ids.shape[1] - self.size
        self.model.commit(p.ids[:, :head], p.positions[:, :head], self.cache, p.valid[:, :head])
        self.pending = Clean(p.ids[:, head:], p.positions[:, head:], p.valid[:, head:])
        return p.valid[:, :head].any(dim=1).tolist()

    def forward(self, block: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """One denoising pass over `block` (B, L') at the current positions -> logits (B, L', V), valid at
        `read`; the pending clean blocks are stored in the cache by the same pass."""
        pending = self.pending
        self.pending = None
        return self.model.denoise(block, self.positions(), self.cache, read=read, clean=pending)

    def positions(self) -> torch.Tensor:
        return self.start[:, None] + torch.arange(self.size, device=self.start.device)  # (B, L')

    def keep(self, live: list[int]) -> None:
        if len(live) == len(self.rows):
            return
        assert self.pending is None, "rows leave between blocks, after the pending blocks were stored"
        idx = torch.tensor(live, dtype=torch.long, device=self.block.device)
        self.rows = [self.rows[i] for i in live]
        self.generators = [self.generators[i] for i in live]
        self.cache.select_rows(idx)
        self.block = self.block[idx]
        self.start = self.start[idx]
        self.first_gen = [self.first_gen[i] for i in live]

    def next_block(self) -> None:
        """The finished block becomes pending (the next block's first pass stores it); a fresh noisy block."""
        valid = torch.ones_like(self.block, dtype=torch.bool)
        self.pending = Clean(self.block, self.positions(), valid)
        self.start = self.start + self.size
        self.block = torch.full_like(self.block, self.mask_id)
        self.first_gen = [0] * len(self.rows)
