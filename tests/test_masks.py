import pytest
import torch

from bd3_plugin.core.masks import block_causal_mask, block_diff_mask, with_key_padding


def naive_block_diff(n: int, size: int) -> torch.Tensor:
    """The three-part definition of the spec, one (q, k) pair at a time."""
    out = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q in range(2 * n):
        for k in range(2 * n):
            q_clean, k_clean = q >= n, k >= n
            q_blk = (q - n if q_clean else q) // size
            k_blk = (k - n if k_clean else k) // size
            m_bd = q_blk == k_blk and q_clean == k_clean
            m_obc = k_clean and not q_clean and q_blk > k_blk
            m_bc = k_clean and q_clean and q_blk >= k_blk
            out[q, k] = m_bd or m_obc or m_bc
    return out


@pytest.mark.parametrize("n,size", [(8, 1), (8, 2), (12, 4), (16, 16), (6, 3)])
def test_block_diff_mask_matches_definition(n, size):
    assert torch.equal(block_diff_mask(n, size), naive_block_diff(n, size))


def test_clean_half_never_sees_noisy_half():
    m = block_diff_mask(16, 4)
    assert not m[16:, :16].any()


@pytest.mark.parametrize("n,size,window", [(12, 4, None), (12, 4, 2), (10, 1, 3), (8, 8, None)])
def test_block_causal_mask(n, size, window):
    expect = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            gap = q // size - k // size
            expect[q, k] = gap >= 0 and (window is None or gap < window)
    assert torch.equal(block_causal_mask(n, size, window_blocks=window), expect)


def test_key_padding_keeps_padding_queries_finite():
    mask = block_causal_mask(4, 2)
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    full = with_key_padding(mask, valid)  # (B, 1, Tq, Tk)
    assert full.shape == (2, 1, 4, 4)
    # Row 0: real queries see only real keys; a padding query sees only its own slot.
    assert torch.equal(full[0, 0, 2:], torch.tensor([[False, False, True, True]] * 2))
    assert torch.equal(full[0, 0, 0], torch.tensor([True, False, False, False]))
    assert torch.equal(full[1, 0], mask)
