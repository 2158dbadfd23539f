"""KV cache of the clean, committed blocks of a batch of sequences (spec §2.3).

Keys are stored after rotary embedding, at each token's absolute position. Rotary attention depends only
on position differences, so this equals the reference code's re-based window (which caches pre-rotary
projections and re-rotates on every call) while costing nothing per step. All rows share one slot layout:
rows with shorter prompts are left-padded by whole blocks and their padding slots are marked invalid.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, *, n_layers: int, batch: int, n_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, n_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0  # slots in use, the same for every row

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    def prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, length, Dh) keys and values of the committed tokens."""
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]

    def prefix_valid(self) -> torch.Tensor:
        return self.valid[:, : self.length]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one layer's (B, H, T, Dh) keys/values after the prefix; `advance` makes them visible."""
        n = k.shape[2]
        assert self.length + n <= self.capacity, "call make_room before committing"
        self.keys[layer][:, :, self.length : self.length + n] = k
        self.values[layer][:, :, self.length : self.length + n] = v

    def advance(self, valid: torch.Tensor) -> None:
        """Make the (B, T) tokens just written part of the prefix."""
        n = valid.shape[1]
        self.valid[:, self.length : self.length + n] = valid
        self.length += n

    def make_room(self, n: int) -> None:
        """Slide the window left so that `n` more tokens fit (generation past model_length): the oldest
        committed tokens leave, so a block sees at most model_length - L' tokens before it."""
        drop = self.length + n - self.capacity
        if drop <= 0:
            return
        if n > self.capacity:
            raise ValueError(f"cannot commit {n} tokens into a cache window of {self.capacity}")
        keep = self.length - drop
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[:, :, :keep] = t[:, :, drop : self.length].clone()
        self.valid[:, :keep] = self.valid[:, drop : self.length].clone()
        self.valid[:, keep:] = False
        self.length = keep

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished sequences leave the batch)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid = self.valid[rows]
