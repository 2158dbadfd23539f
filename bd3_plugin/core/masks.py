"""Attention masks of block diffusion (spec §2). True means "may attend"."""
from __future__ import annotations

import torch


def block_diff_mask(seq_len: int, block_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The (2L, 2L) training mask over x_t ⊕ x_0.

    Noisy tokens see their own noisy block (M_BD) and clean tokens of strictly earlier blocks (M_OBC);
    clean tokens see clean tokens of the same or earlier blocks (M_BC). The clean half never sees the
    noisy half, which is what makes KV caching of clean blocks exact.
    """
    idx = torch.arange(2 * seq_len, device=device)
    clean = idx >= seq_len
    blk = torch.where(clean, idx - seq_len, idx) // block_size
    q_clean = clean[:, None]
    k_clean = clean[None, :]
    q_blk = blk[:, None]
    k_blk = blk[None, :]
    diagonal = (q_blk == k_blk) & (q_clean == k_clean)
    offset_causal = k_clean & ~q_clean & (q_blk > k_blk)
    block_causal = k_clean & q_clean & (q_blk >= k_blk)
    return diagonal | offset_causal | block_causal


def block_causal_mask(seq_len: int, block_size: int, device: torch.device | None = None,
                      window_blocks: int | None = None, first_query: int = 0) -> torch.Tensor:
    """The (T, T) mask of one view: causal across blocks, bidirectional inside a block.

    With `window_blocks`, a block sees only itself and the `window_blocks - 1` blocks before it: the
    sliding window that lets generation run past model_length. `first_query` keeps only the query rows
    from there on, (T − first_query, T): the new tokens of a pass whose earlier keys come from a cache.
    """
    blk = torch.arange(seq_len, device=device) // block_size
    gap = blk[first_query:, None] - blk[None, :]
    allowed = gap >= 0
    if window_blocks is not None:
        allowed &= gap < window_blocks
    return allowed


def with_key_padding(mask: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Combine a (Tq, Tk) mask with per-row key validity (B, Tk) into (B, 1, Tq, Tk).

    A query whose every key is padding would give NaN in softmax; such queries are padding themselves
    and only their own key is opened for them, so their (discarded) output stays finite.
    """
    full = mask[None] & key_valid[:, None, :]  # (B, Tq, Tk)
    dead = ~full.any(dim=-1)  # (B, Tq)
    if dead.any():
        tq, tk = mask.shape
        eye = torch.zeros(tq, tk, dtype=torch.bool, device=mask.device)
        eye[torch.arange(tq), torch.arange(tk - tq, tk)] = True  # a query's own slot is its last-Tq key
        full = full | (dead[..., None] & eye[None])
    return full[:, None]  # (B, 1, Tq, Tk)
