"""Block-causal attention metadata for vLLM's V1 runner, built from the runner's own CommonAttentionMetadata.

- `split_into_blocks`: every request's query cut at absolute multiples of L' into non-causal pieces (the
  step's metadata: prefill is block-causal, a block sees the cached prefix and itself).
- `take_blocks`: the metadata of a subset of those pieces, each one whole block of L' tokens, for a pass
  that runs the model over just the blocks being denoised.

Both stay on the host except for the per-token and per-piece tensors the kernels read; neither reads the
device.
"""
from __future__ import annotations

import dataclasses

import torch

# Per-piece or per-token fields that `take_blocks` cannot subset; they must be absent (None).
_UNSUPPORTED = ("encoder_seq_lens", "encoder_seq_lens_cpu", "dcp_local_seq_lens", "logits_indices_padded",
                "req_idx", "mm_req_doc_ranges", "rswa_prefix_lens", "replayssm_decode_base_cpu")


def _query_positions(cm, q_lens: torch.Tensor) -> torch.Tensor:
    """Absolute position of every query token (CPU). A request's query is contiguous and ends at its
    sequence length, so the host copy of the sequence lengths gives them without reading the device."""
    n = int(q_lens.sum())
    if cm.seq_lens_cpu_upper_bound is None:
        return cm.positions[:n].cpu().long()
    ends = cm.seq_lens_cpu_upper_bound[: cm.num_reqs].long()
    first = torch.repeat_interleave(ends - q_lens, q_lens)  # (n,) position of each request's first query token
    offset = torch.arange(n) - torch.repeat_interleave(torch.cumsum(q_lens, 0) - q_lens, q_lens)
    return first + offset


def split_into_blocks(cm, block_size: int):
    """Attention metadata with each request's query cut at absolute multiples of `block_size`, every
    piece non-causal with the KV length up to its own last token: block-causal attention."""
    qsl = cm.query_start_loc_cpu.long()
    n = int(qsl[-1])
    q_lens = qsl[1:] - qsl[:-1]
    pos = _query_positions(cm, q_lens)
    req_of_token = torch.repeat_interleave(torch.arange(cm.num_reqs), q_lens)
    first = torch.zeros(n, dtype=torch.bool)
    first[qsl[:-1][q_lens > 0]] = True
    starts = (first | (pos % block_size == 0)).nonzero().flatten()
    ends = torch.cat((starts[1:], torch.tensor([n])))
    new_qsl = torch.cat((starts, torch.tensor([n]))).to(cm.query_start_loc_cpu.dtype)
    seq_lens = (pos[ends - 1] + 1).to(cm.seq_lens.dtype)  # (pieces,) on the host
    owner = req_of_token[starts]
    changes = dict(query_start_loc=new_qsl.to(cm.query_start_loc.device), query_start_loc_cpu=new_qsl,
                   seq_lens=seq_lens.to(cm.seq_lens.device), seq_lens_cpu_upper_bound=seq_lens,
                   num_reqs=len(starts), max_query_len=int((ends - starts).max()), max_seq_len=int(seq_lens.max()),
                   block_table_tensor=cm.block_table_tensor[owner.to(cm.block_table_tensor.device)],
                   causal=False, _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
    if cm.is_prefilling is not None:
        changes["is_prefilling"] = cm.is_prefilling[owner.to(cm.is_prefilling.device)]
    return dataclasses.replace(cm, **changes)


def take_blocks(split, starts: list[int], block_size: int):
    """The metadata of the pieces of `split` (a `split_into_blocks` result) that begin at the query
    tokens `starts`, each a whole block of `block_size` tokens, laid out one after the other: the
    query of a pass over just those blocks. Each keeps its block table row and KV length."""
    for name in _UNSUPPORTED:
        if getattr(split, name, None) is not None:
            raise ValueError(f"take_blocks: attention metadata with {name} set is not supported")
    qsl = split.query_start_loc_cpu.long()
    first = torch.tensor(starts, dtype=torch.long)
    piece = torch.searchsorted(qsl, first)  # (b,) the piece that starts at each block
    if not (piece < len(qsl) - 1).all() or not (qsl[piece] == first).all() \
            or not (qsl[piece + 1] - qsl[piece] == block_size).all():
        raise ValueError(f"take_blocks: query tokens {starts} do not each start a piece of {block_size} tokens")
    tokens = (first[:, None] + torch.arange(block_size)).flatten()  # (b·L',) flat token index in the step
    new_qsl = (torch.arange(len(starts) + 1) * block_size).to(split.query_start_loc_cpu.dtype)
    seq_lens = split.seq_lens_cpu_upper_bound[piece]
    changes = dict(query_start_loc=new_qsl.to(split.query_start_loc.device), query_start_loc_cpu=new_qsl,
                   seq_lens=seq_lens.to(split.seq_lens.device), seq_lens_cpu_upper_bound=seq_lens,
                   num_reqs=len(starts), num_actual_tokens=len(tokens), max_query_len=block_size,
                   max_seq_len=int(seq_lens.max()),
                   block_table_tensor=split.block_table_tensor[piece.to(split.block_table_tensor.device)],
                   slot_mapping=split.slot_mapping[tokens.to(split.slot_mapping.device)],
                   _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
    if split.positions is not None:
        changes["positions"] = split.positions[tokens.to(split.positions.device)]
    if split.is_prefilling is not None:
        changes["is_prefilling"] = split.is_prefilling[piece.to(split.is_prefilling.device)]
    return dataclasses.replace(split, **changes)
