import torch

from helpers import assert_close, random_model, tiny_config


def cached_block_logits(model, x: torch.Tensor, prefill_blocks: int = 0) -> torch.Tensor:
    """Denoise-mode logits of every block of x, committing block by block (the first `prefill_blocks`
    committed in one pass)."""
    size = model.config.block_size
    b, n = x.shape
    pos = torch.arange(n).expand(b, n)
    cache = model.new_cache(b)
    out = []
    start = prefill_blocks * size
    if start:
        out.append(model(x[:, :start]))  # the committed blocks' own logits: a commit computes none
        model.commit(x[:, :start], pos[:, :start], cache)
    for s in range(start, n, size):
        out.append(model.denoise(x[:, s : s + size], pos[:, s : s + size], cache))
        model.commit(x[:, s : s + size], pos[:, s : s + size], cache)
    return torch.cat(out, dim=1)


def test_kv_cached_blocks_equal_one_block_causal_forward():
    model = random_model()
    x = torch.randint(0, 20, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        assert_close(cached_block_logits(model, x), full, 1e-5, "cached vs full")
        assert_close(cached_block_logits(model, x, prefill_blocks=3), full, 1e-5, "prefill vs full")


def test_sliding_window_past_model_length():
    model = random_model(tiny_config(model_length=16))
    x = torch.randint(0, 20, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(cached_block_logits(model, x, prefill_blocks=6), model(x), 1e-5, "windowed")


def test_earlier_blocks_do_not_see_later_blocks():
    model = random_model()
    x = torch.randint(0, 20, (2, 32), generator=torch.Generator().manual_seed(3))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 20, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert_close(a[:, :12], b[:, :12], 1e-6, "blocks 0-2")
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3  # the later blocks did change


def test_left_padding_in_the_cache_changes_nothing():
    """A row whose cache is left-padded by whole blocks gives the logits it gives alone."""
    model = random_model()
    size = model.config.block_size
    x = torch.randint(0, 20, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        alone = model(x)[:, 8:]
        cache = model.new_cache(1)
        ids = torch.cat((torch.zeros(1, 2 * size, dtype=torch.long), x[:, :8]), dim=1)
        valid = torch.arange(16)[None] >= 2 * size
        pos = (torch.arange(16) - 2 * size).clamp(min=0)[None]
        model.commit(ids, pos, cache, valid)
        padded = model.denoise(x[:, 8:], torch.arange(8, 12)[None], cache)
    assert_close(padded, alone, 1e-5, "padded")


def test_training_pass_clean_half_is_a_clean_forward():
    """The x_t ⊕ x_0 pass with x_t = x_0 gives the block-causal logits (noisy block b sees itself and
    clean blocks < b, which is what a clean view shows it)."""
    model = random_model()
    x = torch.randint(0, 20, (2, 32), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_close(model.forward_train(x, x), model(x), 1e-5, "2L vs view")
