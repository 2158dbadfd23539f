"""The runner's split attention metadata against a pure-PyTorch paged attention with the varlen semantics of
FlashAttention and vLLM's Triton kernel (`cu_seqlens_q`, `seqused_k`, a block table, non-causal pieces),
compared with the core's block-causal mask; and the scheduler's rounding of chunks to whole blocks."""
import pytest
import torch

from bd3_plugin.core.masks import block_causal_mask


# ---- the split metadata against FlashAttention/Triton varlen semantics -----------------------------
def paged_attention(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, causal: bool):
    """Varlen attention over a paged cache as FlashAttention's `flash_attn_varlen_func` and vLLM's Triton
    `unified_attention` define it: query i of sequence b is row cu_seqlens_q[b] + i; its keys are the first
    seqused_k[b] slots of the pages block_table[b]; causal aligns the queries to the end of the keys
    (query i sits at key position seqused_k[b] - q_len + i), non-causal sees all seqused_k[b] keys.
    q (T, H, D), k_cache/v_cache (pages, page_size, H, D) -> (T, H, D)."""
    out = torch.zeros_like(q)
    page = k_cache.shape[1]
    for b in range(len(seqused_k)):
        lo, hi, n_k = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]), int(seqused_k[b])
        pages = block_table[b, : -(-n_k // page)]
        k = k_cache[pages].flatten(0, 1)[:n_k]  # (n_k, H, D)
        v = v_cache[pages].flatten(0, 1)[:n_k]
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi], k) / q.shape[-1] ** 0.5  # (H, q_len, n_k)
        if causal:
            q_pos = n_k - (hi - lo) + torch.arange(hi - lo)
            scores = scores.masked_fill(torch.arange(n_k)[None, :] > q_pos[:, None], float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def dense_attention(q, k, v, allowed):
    """q (T, H, D), k/v (S, H, D), allowed (T, S) bool -> (T, H, D)."""
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def _scenario(block_size: int, seed: int = 0):
    """Three requests in one step, their K/V already in a shuffled paged cache (page size 4): a chunked
    prefill that starts mid-sequence, a block step at its end, and a short first prefill."""
    g = torch.Generator().manual_seed(seed)
    heads, dim, page = 2, 8, 4
    computed, scheduled = [2 * block_size, 3 * block_size, 0], [3 * block_size, block_size, block_size - 1]
    seq = [c + s for c, s in zip(computed, scheduled)]
    n_pages = [-(-s // page) for s in seq]
    ids = torch.randperm(sum(n_pages) + 3, generator=g)[: sum(n_pages)]
    table = torch.full((3, max(n_pages)), -1, dtype=torch.long)
    k_cache = torch.zeros(len(ids) + 3, page, heads, dim)
    v_cache = torch.zeros_like(k_cache)
    keys, values, taken = [], [], 0
    for r, s in enumerate(seq):
        table[r, : n_pages[r]] = ids[taken : taken + n_pages[r]]
        taken += n_pages[r]
        keys.append(torch.randn(s, heads, dim, generator=g))
        values.append(torch.randn(s, heads, dim, generator=g))
        for p in range(s):
            k_cache[table[r, p // page], p % page], v_cache[table[r, p // page], p % page] = keys[r][p], values[r][p]
    queries = [torch.randn(s, heads, dim, generator=g) for s in scheduled]
    return computed, scheduled, seq, table, k_cache, v_cache, keys, values, queries


def _metadata(computed, scheduled, seq, table, with_host_seq_lens: bool):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl = torch.tensor([0] + scheduled).cumsum(0).to(torch.int32)
    positions = torch.cat([torch.arange(c, c + s) for c, s in zip(computed, scheduled)])
    seq_lens = torch.tensor(seq, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=len(seq),
        num_actual_tokens=int(qsl[-1]), max_query_len=max(scheduled), max_seq_len=max(seq), block_table_tensor=table,
        slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.long), positions=positions,
        seq_lens_cpu_upper_bound=seq_lens.clone() if with_host_seq_lens else None,
        is_prefilling=torch.tensor([True, False, True]),
        _num_computed_tokens_cache=torch.zeros(3, dtype=torch.int32))


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_split_metadata_gives_block_causal_attention_under_varlen_paged_semantics(block_size):
    from vllm_backend.worker.block_metadata import split_into_blocks

    computed, scheduled, seq, table, k_cache, v_cache, keys, values, queries = _scenario(block_size)
    q = torch.cat(queries)
    cm = _metadata(computed, scheduled, seq, table, with_host_seq_lens=True)
    # The reference itself: vLLM's own causal metadata gives causal attention.
    causal = paged_attention(q, k_cache, v_cache, cm.query_start_loc_cpu, cm.seq_lens, table, causal=True)
    split = split_into_blocks(cm, block_size)
    assert split.causal is False
    got = paged_attention(q, k_cache, v_cache, split.query_start_loc_cpu, split.seq_lens, split.block_table_tensor,
                          causal=False)
    for r in range(3):
        rows = slice(sum(scheduled[:r]), sum(scheduled[: r + 1]))
        q_pos = torch.arange(computed[r], seq[r])
        tri = torch.arange(seq[r])[None, :] <= q_pos[:, None]
        assert torch.allclose(causal[rows], dense_attention(queries[r], keys[r], values[r], tri), atol=1e-5)
        # The core's mask, cut at what is in the cache this step: the query sees its whole block.
        allowed = block_causal_mask(-(-seq[r] // block_size) * block_size, block_size)[q_pos][:, : seq[r]]
        want = dense_attention(queries[r], keys[r], values[r], allowed)
        assert torch.allclose(got[rows], want, atol=1e-5), (block_size, r)
    if block_size > 1:
        assert not torch.allclose(got, causal, atol=1e-3)  # the split changes what is seen


def test_split_metadata_fields_are_consistent_and_need_no_device_read():
    from vllm_backend.worker.block_metadata import split_into_blocks

    computed, scheduled, seq, table, *_ = _scenario(4)
    from_host = split_into_blocks(_metadata(computed, scheduled, seq, table, with_host_seq_lens=True), 4)
    cm = _metadata(computed, scheduled, seq, table, with_host_seq_lens=False)
    from_positions = split_into_blocks(cm, 4)
    for field in ("query_start_loc_cpu", "seq_lens", "block_table_tensor", "is_prefilling"):
        assert torch.equal(getattr(from_host, field), getattr(from_positions, field)), field
    pieces = from_host.num_reqs
    assert pieces == 3 + 1 + 1 and from_host.query_start_loc_cpu.tolist() == [0, 4, 8, 12, 16, 19]
    assert torch.equal(from_host.seq_lens_cpu_upper_bound, from_host.seq_lens)
    assert from_host._num_computed_tokens_cache is None and from_host._token_to_req_indices_cache is None
    assert from_host.is_prefilling.tolist() == [True, True, True, False, True]
    assert from_host.max_query_len == 4 and from_host.max_seq_len == max(seq)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_a_pass_over_some_blocks_attends_as_the_whole_step_does(block_size):
    """`take_blocks` keeps whole-block pieces of the split step: attention over just those blocks' queries
    (the further denoising passes) equals those rows of attention over the whole step."""
    from vllm_backend.worker.block_metadata import split_into_blocks, take_blocks

    computed, scheduled, seq, table, k_cache, v_cache, keys, values, queries = _scenario(block_size)
    q = torch.cat(queries)
    cm = _metadata(computed, scheduled, seq, table, with_host_seq_lens=True)
    cm.slot_mapping = torch.arange(cm.num_actual_tokens) * 7  # distinct slots, to see which are kept
    split = split_into_blocks(cm, block_size)
    whole = paged_attention(q, k_cache, v_cache, split.query_start_loc_cpu, split.seq_lens, split.block_table_tensor,
                            causal=False)
    # the block step (request 1) and the last whole block of the prefill (request 0)
    starts = [scheduled[0], scheduled[0] - block_size]
    sub = take_blocks(split, starts, block_size)
    tokens = torch.cat([torch.arange(s, s + block_size) for s in starts])
    assert sub.num_reqs == 2 and sub.num_actual_tokens == 2 * block_size and sub.causal is False
    assert torch.equal(sub.slot_mapping, split.slot_mapping[tokens])
    assert torch.equal(sub.positions, split.positions[tokens])
    got = paged_attention(q[tokens], k_cache, v_cache, sub.query_start_loc_cpu, sub.seq_lens, sub.block_table_tensor,
                          causal=False)
    assert torch.equal(got, whole[tokens])
    with pytest.raises(ValueError, match="do not each start a piece"):
        take_blocks(split, [1], block_size + 1)


# ---- the scheduler's rounding to whole blocks ----------------------------------------------------------
def test_whole_blocks_keeps_the_longest_chunk_that_ends_on_a_block_or_at_the_target():
    from vllm_backend.worker.engine import whole_blocks

    size = 4
    for computed in range(0, 24, size):
        for target in range(computed + 1, computed + 13):
            for new in range(0, target - computed + 1):
                keep = whole_blocks(computed, new, target, size)
                ok = [k for k in range(new + 1) if k == 0 or (computed + k) % size == 0 or computed + k == target]
                assert keep == max(ok), (computed, new, target)
