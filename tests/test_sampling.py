import pytest
import torch

from bd3_plugin.sampling.samplers import (ddpm_greedy_count, ddpm_step, draw_tokens, first_hitting_choice,
    first_hitting_step, greedy_positions, nucleus_filter, threshold_step, token_probs, top_k_filter)


def naive_nucleus(p: list[float], top_p: float) -> list[float]:
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, total = [], 0.0
    for rank, i in enumerate(order):
        total += p[i]
        if total <= top_p or rank == 0:
            kept.append(i)
    z = sum(p[i] for i in kept)
    return [p[i] / z if i in kept else 0.0 for i in range(len(p))]


def test_nucleus_excludes_the_crossing_token():
    gen = torch.Generator().manual_seed(0)
    for top_p in (0.3, 0.5, 0.9, 0.99):
        p = torch.softmax(torch.randn(6, 10, generator=gen, dtype=torch.float64) * 2, -1)
        got = nucleus_filter(p, top_p)
        for row in range(6):
            assert torch.allclose(got[row], torch.tensor(naive_nucleus(p[row].tolist(), top_p), dtype=torch.float64))
    assert torch.equal(nucleus_filter(torch.tensor([[0.5, 0.3, 0.2]]), 0.5), torch.tensor([[1.0, 0.0, 0.0]]))


def naive_top_k(p: list[float], k: int) -> list[float]:
    """Sort by (probability descending, token id ascending) by hand, keep the first k, renormalise."""
    kept = sorted(range(len(p)), key=lambda i: (-p[i], i))[:k]
    z = sum(p[i] for i in kept)
    return [p[i] / z if i in kept else 0.0 for i in range(len(p))]


def tied_probs(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Distributions with many exact ties: softmax of small integer logits."""
    logits = torch.randint(0, 4, (rows, vocab), generator=torch.Generator().manual_seed(seed)).double()
    return torch.softmax(logits, dim=-1)


def test_top_k_keeps_the_k_most_probable_and_breaks_ties_by_the_lowest_id():
    for seed in range(5):
        p = tied_probs(8, 12, seed)
        for k in (1, 2, 3, 5, 11):
            got = top_k_filter(p, k)
            for row in range(8):
                expect = torch.tensor(naive_top_k(p[row].tolist(), k), dtype=torch.float64)
                assert torch.allclose(got[row], expect, atol=1e-15), (seed, k, row)
            assert ((got > 0).sum(-1) == k).all()  # exactly k, ties or not
    p = tied_probs(4, 12, 9)
    for off in (None, 0, -1, 12, 50):
        assert torch.equal(top_k_filter(p, off), p)
    assert torch.equal(top_k_filter(torch.tensor([[0.25, 0.25, 0.25, 0.25]]), 2), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))


def test_token_probs_apply_temperature_then_top_k_then_the_nucleus():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 10, generator=gen) * 2
    logits[0, 3] = logits[0, 5] = logits[0].max() + 1  # a tie at the top
    for temperature, top_k, top_p in [(1.0, 3, 1.0), (0.7, 4, 0.8), (1.5, 6, 0.6), (0.5, 2, 0.99), (1.0, 0, 0.9)]:
        got = token_probs(logits, mask_id=9, temperature=temperature, top_p=top_p, top_k=top_k)
        for row in range(6):
            z = logits[row].double() / temperature
            z[9] = -float("inf")
            p = torch.softmax(z, -1).tolist()
            expect = naive_nucleus(naive_top_k(p, top_k) if top_k else p, top_p)
            assert torch.allclose(got[row], torch.tensor(expect, dtype=torch.float64)), (temperature, top_k, top_p)


def test_gumbel_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    n = 40000
    uniforms = torch.rand(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = draw_tokens(probs.expand(n, 4), uniforms)
    freq = torch.bincount(draws, minlength=4).double() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() < 4 * sigma).all(), freq


def test_token_probs_never_give_the_mask():
    logits = torch.zeros(3, 5)
    logits[:, 4] = 50.0  # the mask id is the most likely logit
    p = token_probs(logits, mask_id=4, temperature=0.5, top_p=1.0)
    assert (p[:, 4] == 0).all() and torch.allclose(p.sum(-1), torch.ones(3, dtype=torch.float64))


def test_first_hitting_reveals_one_uniform_position():
    logits = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(2))
    masked = torch.tensor([[True, True, False, True], [False, False, False, False]])
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    counts = torch.zeros(4)
    for _ in range(3000):
        read = first_hitting_choice(masked, gens, 1.0)
        step = first_hitting_step(logits, read, gens, mask_id=8, temperature=1.0, top_p=1.0)
        reveal, tokens = step.reveal, step.tokens
        assert torch.equal(reveal, read) and reveal[0].sum() == 1
        assert not reveal[1].any() and not (reveal & ~masked).any()
        assert (tokens[reveal] != 8).all()
        counts += reveal[0].float()
    assert counts[2] == 0 and ((counts[[0, 1, 3]] / 3000 - 1 / 3).abs() < 0.035).all(), counts


def test_ddpm_step_reveal_rate_and_final_step():
    logits = torch.randn(1, 16, 9, generator=torch.Generator().manual_seed(5))
    masked = torch.ones(1, 16, dtype=torch.bool)
    gen = [torch.Generator().manual_seed(6)]
    rate = sum(ddpm_step(logits, masked, gen, t=0.8, s=0.6, mask_id=8, temperature=1.0, top_p=1.0).reveal.sum().item()
               for _ in range(500)) / (500 * 16)
    assert abs(rate - 0.25) < 0.02
    step = ddpm_step(logits, masked, gen, t=0.1, s=0.0, mask_id=8, temperature=1.0, top_p=1.0)
    reveal, tokens = step.reveal, step.tokens
    assert reveal.all() and (tokens != 8).all()


def test_threshold_step():
    logits = torch.full((2, 4, 6), -5.0)
    logits[0, 0, 2] = logits[0, 2, 3] = 10.0  # two confident positions in row 0, none in row 1
    logits[1, 1, 1] = 1.0
    masked = torch.ones(2, 4, dtype=torch.bool)
    gens = [torch.Generator().manual_seed(7)] * 2
    step = threshold_step(logits, masked, gens, threshold=0.9, mask_id=5, temperature=0.0, top_p=1.0)
    reveal, tokens = step.reveal, step.tokens
    assert reveal[0].tolist() == [True, False, True, False] and tokens[0, 0] == 2 and tokens[0, 2] == 3
    assert reveal[1].tolist() == [False, True, False, False] and tokens[1, 1] == 1  # the most confident one


def naive_greedy_positions(conf: list[float], masked: list[bool], count: int, tie: float = 1e-6) -> list[bool]:
    """One position at a time: the leftmost masked position within `tie` of the best remaining one."""
    chosen = [False] * len(conf)
    for _ in range(count):
        left = [i for i in range(len(conf)) if masked[i] and not chosen[i]]
        if not left:
            break
        top = max(conf[i] for i in left)
        chosen[min(i for i in left if conf[i] >= top - tie)] = True
    return chosen


def test_greedy_positions_equal_a_naive_one_at_a_time_choice():
    gen = torch.Generator().manual_seed(11)
    for _ in range(50):
        conf = torch.rand(5, 8, generator=gen, dtype=torch.float64).round(decimals=1)  # many exact ties
        conf += torch.rand(5, 8, generator=gen, dtype=torch.float64) * 1e-8  # and ties within the tolerance
        masked = torch.rand(5, 8, generator=gen) < 0.7
        count = torch.randint(0, 9, (5,), generator=gen)
        got = greedy_positions(torch.where(masked, conf, -1.0), masked, count)
        for r in range(5):
            assert got[r].tolist() == naive_greedy_positions(conf[r].tolist(), masked[r].tolist(), int(count[r]))


def test_ddpm_greedy_count_is_the_rounded_expected_number_of_reveals():
    for n in range(0, 9):
        for steps in (1, 3, 4, 8, 13):
            for i in range(steps):
                t, s = 1 - i / steps, 1 - (i + 1) / steps
                expected = n if s <= 0 else n * (t - s) / t
                naive = min(n, int(expected + 0.5 + 1e-9))
                assert ddpm_greedy_count(torch.tensor([n]), t, s).item() == naive
    # A fully masked block on the default grid (steps = L') reveals one token per step.
    n, size = 16, 16
    for i in range(size):
        assert ddpm_greedy_count(torch.tensor([n]), 1 - i / size, 1 - (i + 1) / size).item() == 1
        n -= 1


@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm", "threshold"])
def test_temperature_zero_steps_are_greedy_and_draw_nothing(algorithm):
    logits = torch.randn(3, 6, 9, generator=torch.Generator().manual_seed(12))
    masked = torch.tensor([[True] * 6, [False, True, True, False, True, False], [False] * 6])
    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    states = [g.get_state() for g in gens]
    kw = dict(mask_id=8, temperature=0.0, top_p=1.0)
    if algorithm == "first_hitting":
        read = first_hitting_choice(masked, gens, 0.0)
        assert torch.equal(read, masked)  # the greedy position depends on the logits: read every mask
        step = first_hitting_step(logits, read, gens, **kw)
        count = [1, 1, 0]
    elif algorithm == "ddpm":
        step = ddpm_step(logits, masked, gens, t=0.5, s=0.25, **kw)
        count = [3, 2, 0]  # 6·½ = 3, 3·½ = 1.5 rounds up to 2
    else:
        step = threshold_step(logits, masked, gens, threshold=1.0, **kw)
        count = [1, 1, 0]  # nothing reaches probability 1: the fallback
    reveal, tokens = step.reveal, step.tokens
    assert all(torch.equal(g.get_state(), st) for g, st in zip(gens, states))
    probs = token_probs(logits, 8, 0.0, 1.0)
    conf, best = probs.max(-1)
    for r in range(3):
        expect = naive_greedy_positions(conf[r].tolist(), masked[r].tolist(), count[r])
        assert reveal[r].tolist() == expect
        assert tokens[r][reveal[r]].tolist() == best[r][reveal[r]].tolist()


def _step(algorithm, logits, masked, gens, **kw):
    if algorithm == "first_hitting":
        step = first_hitting_step(logits, first_hitting_choice(masked, gens, kw["temperature"]), gens, **kw)
    elif algorithm == "ddpm":
        step = ddpm_step(logits, masked, gens, t=0.6, s=0.2, **kw)
    else:
        step = threshold_step(logits, masked, gens, threshold=0.5, **kw)
    return step.reveal, step.tokens


@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm", "threshold"])
def test_sampled_tokens_always_lie_in_the_top_k(algorithm):
    """Over many seeds, every revealed token is one of the k most probable (ties: lowest ids), by hand;
    with k = 1 at temperature 1 it is the greedy token, the argmax (lowest id among ties)."""
    masked = torch.tensor([[True] * 6, [False, True, True, False, True, True]])
    for seed in range(150):
        logits = torch.randint(0, 5, (2, 6, 9), generator=torch.Generator().manual_seed(seed)).float()  # ties
        gens = [torch.Generator().manual_seed(1000 + seed), torch.Generator().manual_seed(2000 + seed)]
        k = 1 + seed % 4
        reveal, tokens = _step(algorithm, logits, masked, gens, mask_id=8, temperature=1.3, top_p=1.0, top_k=k)
        assert reveal.any()
        for r, i in reveal.nonzero().tolist():
            p = torch.softmax(logits[r, i, :8].double(), -1).tolist()  # the mask (id 8) is never predicted
            allowed = sorted(range(8), key=lambda v: (-p[v], v))[:k]
            assert tokens[r, i].item() in allowed, (seed, k, r, i)
        reveal, tokens = _step(algorithm, logits, masked, gens, mask_id=8, temperature=1.0, top_p=1.0, top_k=1)
        greedy = torch.stack([torch.tensor([max(range(8), key=lambda v: (row[v], -v)) for row in blk.tolist()])
                              for blk in logits])  # (2, 6) argmax by hand, lowest id among ties
        assert torch.equal(tokens[reveal], greedy[reveal]), seed
