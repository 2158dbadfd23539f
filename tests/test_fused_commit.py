"""The commit fused into the next block's first denoising pass, and logits computed only where read."""
import pytest
import torch

from bd3_plugin.sampling.config import SamplerConfig

from bd3_plugin.sampling.generate import generate
from bd3_plugin.sampling.greedy_completion import greedy_completions
from bd3_plugin.core.model import BD3LM, Clean
from bd3_plugin.core.generators import seeded_generators
from helpers import assert_close, naive_sample, random_model, tiny_config

PROMPTS = [[], [3], [4, 5, 6], [7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9], list(range(13))]


def fused_block_logits(model, x: torch.Tensor, prefill_blocks: int, read: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Denoise-mode logits of blocks `prefill_blocks`.. of x, each block's pass storing the clean blocks
    before it (the prompt's whole blocks in the first pass): no commit pass at all."""
    size = model.config.block_size
    b, n = x.shape
    pos = torch.arange(n).expand(b, n)
    valid = torch.ones_like(x, dtype=torch.bool)
    cache, out = model.new_cache(b), []
    first = prefill_blocks * size
    pending = Clean(x[:, :first], pos[:, :first], valid[:, :first]) if first else None
    for s in range(first, n, size):
        r = None if read is None else read[:, s - first : s - first + size]  # read covers blocks first..
        out.append(model.denoise(x[:, s : s + size], pos[:, s : s + size], cache, read=r, clean=pending))
        pending = Clean(x[:, s : s + size], pos[:, s : s + size], valid[:, s : s + size])
    return torch.cat(out, dim=1)


def committed_block_logits(model, x: torch.Tensor, prefill_blocks: int) -> torch.Tensor:
    """The same with a separate commit pass before each block: the unfused path."""
    size, (b, n) = model.config.block_size, x.shape
    pos, cache, out = torch.arange(n).expand(b, n), model.new_cache(b), []
    if prefill_blocks:
        model.commit(x[:, : prefill_blocks * size], pos[:, : prefill_blocks * size], cache)
    for s in range(prefill_blocks * size, n, size):
        out.append(model.denoise(x[:, s : s + size], pos[:, s : s + size], cache))
        model.commit(x[:, s : s + size], pos[:, s : s + size], cache)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("model_length,n,prefill", [(32, 32, 0), (32, 32, 3), (16, 40, 4), (16, 40, 1)])
def test_fused_pass_logits_equal_a_full_forward_and_the_commit_path(model_length, n, prefill):
    """Past model_length (16 < 40) the window slides inside the fused pass: the noisy block sees one block
    less of the cache than the clean block stored with it."""
    model = random_model(tiny_config(model_length=model_length))
    x = torch.randint(0, 20, (3, n), generator=torch.Generator().manual_seed(1))
    s = prefill * model.config.block_size
    with torch.no_grad():
        fused = fused_block_logits(model, x, prefill)
        assert_close(fused, model(x)[:, s:], 1e-5, "fused vs full forward")
        assert_close(fused, committed_block_logits(model, x, prefill), 1e-5, "fused vs commit + denoise")


def test_read_slots_are_exact_and_the_others_zero():
    model = random_model()
    x = torch.randint(0, 20, (3, 32), generator=torch.Generator().manual_seed(2))
    read = torch.rand(3, 24, generator=torch.Generator().manual_seed(3)) < 0.3
    read[1, :4] = False  # a row with nothing to read in a block
    read[:, 20:] = False  # a pass that reads nothing at all
    with torch.no_grad():
        part = fused_block_logits(model, x, 2, read=read)
        full = model(x)[:, 8:]
    assert_close(part[read], full[read], 1e-5, "read slots")
    assert (part[~read] == 0).all()


def test_left_padded_prompts_fuse_their_prefill():
    """A row whose prompt blocks are left-padded gives, in the fused first pass, the logits it gives alone."""
    model = random_model()
    x = torch.randint(0, 20, (1, 12), generator=torch.Generator().manual_seed(5))
    ids = torch.cat((torch.zeros(1, 8, dtype=torch.long), x), dim=1)  # 2 padding blocks, 2 prompt blocks, 1 noisy
    valid = torch.arange(20)[None] >= 8
    pos = (torch.arange(20) - 8).clamp(min=0)[None]
    with torch.no_grad():
        cache = model.new_cache(1)
        padded = model.denoise(ids[:, 16:], pos[:, 16:], cache, clean=Clean(ids[:, :16], pos[:, :16], valid[:, :16]))
        assert cache.length == 16 and torch.equal(cache.prefix_valid(), valid[:, :16])
    assert_close(padded, model(x)[:, 8:], 1e-5, "padded")


@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm", "threshold"])
def test_tokens_equal_an_uncached_unfused_sampler(algorithm):
    """Same seeds, same tokens as a reference that runs every pass as a whole-sequence forward with every
    slot's logits and draws in the samplers' order (first-hitting: position, then token). The last prompt
    is longer than model_length: its head is committed in a pass of its own."""
    model = random_model(tiny_config(model_length=16))
    prompts = PROMPTS + [list(range(1, 22))]
    cfg = SamplerConfig(algorithm=algorithm, max_new_tokens=22, top_p=0.9, steps=6, threshold=0.3)
    out = generate(model, prompts, cfg, seeded_generators(range(len(prompts))))
    for i, (prompt, g) in enumerate(zip(prompts, out.generations)):  # up to 21 + 22 tokens: past model_length
        tokens, passes = naive_sample(model, prompt, cfg, i, 22)
        assert g.tokens == tokens, (algorithm, prompt)
        assert g.denoise_steps == passes, (algorithm, prompt)
    assert out.commit_passes == 1


@pytest.mark.parametrize("prompts,n_new", [([[1, 2, 3, 4, 5, 6, 7, 8]], 24), ([list(range(12)), [5, 6, 7, 8]], 24),
                                           ([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], 21), ([[]], 16)])
def test_first_hitting_spends_exactly_one_pass_per_generated_token(prompts, n_new):
    """L' = 4: the prompt's whole blocks (left-padded ones included) and every finished block are stored by
    the next denoising pass, so n new tokens that end a block take n passes in all, prefill included."""
    model = random_model(tiny_config(model_length=64))
    out = generate(model, prompts, SamplerConfig(max_new_tokens=n_new), seeded_generators(range(len(prompts))))
    assert all(len(g.tokens) == n_new for g in out.generations)
    assert out.commit_passes == 0 and out.forward_passes == out.denoise_passes == n_new


def test_a_row_that_ends_is_never_stored(monkeypatch):
    """Row 1 (a whole-block prompt) ends after its first block, row 0 after its second: the pass after
    row 1 ends stores row 0's block only, and nothing is stored after the last block."""
    model = random_model()
    stored = []  # per pass: the rows and positions of the clean blocks it stores

    def spy(self, block, positions, cache, valid=None, *, read=None, clean=None):
        stored.append(None if clean is None else (clean.ids.shape[0], clean.positions[clean.valid].tolist()))
        return BD3LM.denoise.__wrapped__(self, block, positions, cache, valid, read=read, clean=clean)

    spy.__wrapped__ = BD3LM.denoise
    monkeypatch.setattr(BD3LM, "denoise", spy)
    monkeypatch.setattr(BD3LM, "commit", lambda *a, **k: pytest.fail("no commit pass of its own"))
    out = generate(model, [[1, 2, 3], [1, 2, 3, 4]], SamplerConfig(max_new_tokens=4), seeded_generators([0, 1]))
    assert [len(g.tokens) for g in out.generations] == [4, 4]
    assert stored[0] == (2, [0, 1, 2, 3])  # the first pass stores row 1's prompt block (row 0 is all padding)
    assert stored[4] == (1, [0, 1, 2, 3])  # block 0 of row 0, alone: row 1 has ended
    assert len(stored) == 8 and all(s is None for i, s in enumerate(stored) if i not in (0, 4))
    assert out.forward_passes == 8 and out.commit_passes == 0


def test_greedy_completions_take_one_pass_per_block(monkeypatch):
    """Each block is filled in one pass that also stores the blocks before it (the prefix's whole blocks,
    left-padded across states, in the first): as many passes as the longest completion has blocks."""
    model = random_model()
    out = generate(model, [[1, 2, 3, 4, 5], [6]], SamplerConfig(max_new_tokens=9), seeded_generators([0, 1]),
                   record=True)
    states = [(out.trajectories[0], 1, 1), (out.trajectories[1], 0, 2)]  # prefixes of 1 and 0 whole blocks
    calls = []
    denoise = BD3LM.denoise
    monkeypatch.setattr(BD3LM, "denoise", lambda *a, **k: calls.append(k["clean"]) or denoise(*a, **k))
    monkeypatch.setattr(BD3LM, "commit", lambda *a, **k: pytest.fail("no commit pass of its own"))
    got = greedy_completions(model, states, max_new_tokens=9)
    assert [len(g) for g in got] == [9, 9]
    assert len(calls) == 3  # each row: 3 masked slots of the state's block, then 4 + 4 tokens
    assert calls[0].valid.sum(dim=1).tolist() == [4, 0]  # row 0's prompt block; row 1 has none
