"""The NELBO estimators against brute-force enumeration and numeric integration."""
import itertools
import math

import pytest
import torch
from scipy.integrate import quad

from bd3_plugin.likelihood.estimators import Estimator, allocation, exact_passes, choose_estimator, row_plan, subset_weights
from bd3_plugin.likelihood.nelbo import nelbo_planned, nelbo_terms
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.likelihood.scoring import score_documents
from helpers import ar_logprobs, assert_close, random_model, tiny_config

INTERVALS = [(1e-3, 1.0), (0.0, 1.0), (0.3, 0.8), (0.0, 0.5), (0.5, 1.0), (0.2, 0.2), (1.0, 1.0)]


@pytest.mark.parametrize("a,b", INTERVALS)
def test_weights_equal_numeric_integration(a, b):
    for m in (1, 2, 3, 4, 7, 12):
        got = subset_weights(m, a, b)
        for k in range(1, m + 1):
            f = lambda t: t ** (k - 1) * (1 - t) ** (m - k)  # noqa: E731
            expect = f(a) if a == b else quad(f, a, b, epsabs=0, epsrel=1e-12)[0] / (b - a)
            assert got[k].item() == pytest.approx(expect, rel=1e-9, abs=1e-300), (m, k)
        assert got[0] == 0


def test_weights_closed_form_and_large_blocks():
    for m in (5, 16):  # t ~ U[0, 1]: w_k = B(k, m − k + 1) = 1 / (k C(m, k))
        closed = torch.tensor([1 / (k * math.comb(m, k)) for k in range(1, m + 1)], dtype=torch.float64)
        assert_close(subset_weights(m, 0.0, 1.0)[1:], closed, 1e-15, "closed form")
    # Σ_k k C(m,k) t^(k−1) (1−t)^(m−k) = m for every t, so Σ_k k C(m,k) w_k = m on any interval, also where
    # single weights are far below the smallest double.
    for m, (a, b) in itertools.product((300, 1023), [(1e-3, 1.0), (0.3, 0.8)]):
        w = subset_weights(m, a, b)
        log_c = torch.tensor([math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1)
                              for k in range(m + 1)], dtype=torch.float64)
        total = (torch.arange(m + 1) * (w.log() + log_c).exp()).sum().item()
        assert total == pytest.approx(m, rel=1e-9)


def brute_force_nelbo(model, x, eligible, a, b):
    """Σ over blocks and mask subsets of the block's scored tokens: w_k (by numeric integration) times the
    subset's NLL, each block seen by a plain forward over (clean earlier blocks ⊕ noisy block)."""
    size, mask_id, n = model.config.block_size, model.config.mask_id, x.numel()
    total = 0.0
    for start in range(0, n, size):
        pos = [p for p in range(start, min(start + size, n)) if eligible[p]]
        for k in range(1, len(pos) + 1):
            f = lambda t: t ** (k - 1) * (1 - t) ** (len(pos) - k)  # noqa: E731
            w = f(a) if a == b else quad(f, a, b, epsabs=0, epsrel=1e-12)[0] / (b - a)
            for subset in itertools.combinations(pos, k):
                view = x[: start + size].clone()
                view[list(subset)] = mask_id
                with torch.no_grad():
                    logits = model(view[None])[0, list(subset)].double()
                logits[:, mask_id] = -float("inf")
                total += w * -torch.log_softmax(logits, -1)[range(k), x[list(subset)]].sum().item()
    return total


def rows_and_eligible():
    x = torch.randint(0, 20, (3, 11), generator=torch.Generator().manual_seed(5))
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[2, 7:] = False  # a right-padded row with a partial last block
    eligible = valid.clone()
    eligible[:, 0] = False
    eligible[1, :6] = False  # a context that ends inside block 1
    return x, valid, eligible


@pytest.mark.parametrize("a,b", [(1e-3, 1.0), (0.3, 0.8)])
def test_exact_equals_brute_force_enumeration(a, b):
    model = random_model(tiny_config(block_size=4, model_length=12))
    x, valid, eligible = rows_and_eligible()
    with torch.no_grad():
        got = nelbo_planned(model, x, seeded_generators([0, 1, 2]), Estimator("exact", 15), eligible=eligible,
                            valid=valid, eps_min=a, eps_max=b).sum(1)
    for r in range(3):
        n = int(valid[r].sum())
        expect = brute_force_nelbo(model, x[r, :n], eligible[r, :n], a, b)
        assert got[r].item() == pytest.approx(expect, rel=1e-5), r


def test_exact_needs_the_passes_it_enumerates():
    assert exact_passes(4, 1e-3, 1.0) == 15 and exact_passes(4, 1.0, 1.0) == 1  # t ≡ 1: only the full mask
    x = torch.zeros(12, dtype=torch.bool)
    x[1:12] = True
    with pytest.raises(ValueError, match="exact needs 15 passes for a block of 4 scored tokens"):
        row_plan(x, 4, 1e-3, 1.0, Estimator("exact", 14), torch.Generator())
    fallback = row_plan(x, 4, 1e-3, 1.0, Estimator("auto", 14), torch.Generator())
    assert fallback.masks.shape[0] == 14  # auto falls back to stratified within the budget


@pytest.mark.parametrize("name,passes", [("stratified", 4), ("stratified", 2), ("mc", 1)])
def test_random_estimators_are_unbiased(name, passes):
    """Mean over many seeds against brute force, within 4 standard errors of that mean (from the sample
    variance across seeds)."""
    model = random_model(tiny_config(block_size=4, model_length=12))
    x, valid, eligible = rows_and_eligible()
    r, n_seeds = 2, 600
    n = int(valid[r].sum())
    xs, valid_s, elig_s = (t[r : r + 1, :n].expand(n_seeds, n) for t in (x, valid, eligible))
    with torch.no_grad():
        totals = nelbo_terms(model, xs, seeded_generators(range(n_seeds)), estimator=Estimator(name, passes),
                             eligible=elig_s, valid=valid_s).double().sum(1)
    expect = brute_force_nelbo(model, x[r, :n], eligible[r, :n], 1e-3, 1.0)
    stderr = totals.std().item() / math.sqrt(n_seeds)
    assert stderr > 0  # the estimator is random here
    assert abs(totals.mean().item() - expect) < 4 * stderr, (totals.mean().item(), expect, stderr)


def test_stratified_uses_the_budget_and_enumerates_what_fits():
    assert sum(n for _, n in allocation(4, 1e-3, 1.0, 16)) == 15  # every subset: the exact plan
    for m, passes in [(3, 16), (16, 16), (15, 16), (30, 16), (85, 4)]:
        strata = allocation(m, 1e-3, 1.0, passes)
        assert sorted(k for counts, _ in strata for k in counts) == list(range(1, m + 1))  # each k once
        assert sum(n for _, n in strata) == min(passes, 2 ** m - 1)
    x = torch.tensor([False] + [True] * 11)
    strat = row_plan(x, 4, 1e-3, 1.0, Estimator("stratified", 15), torch.Generator().manual_seed(0))
    exact = row_plan(x, 4, 1e-3, 1.0, Estimator("exact", 15), torch.Generator())
    key = lambda p: sorted(zip(map(tuple, p.masks.tolist()), map(tuple, p.coefs.tolist())))  # noqa: E731
    assert len(strat.masks) == 15 and key(strat) == key(exact) and not strat.control.any()


def test_block_size_one_is_the_exact_ar_loglikelihood():
    model = random_model(tiny_config(block_size=1, model_length=16))
    doc = torch.randint(0, 20, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    expect = -sum(ar_logprobs(model, [21], doc))
    for est in (Estimator("exact", 1), Estimator("auto", 16), Estimator("stratified", 3)):
        total = score_documents(model, [doc], bos_id=21, estimator=est).item()
        assert total == pytest.approx(expect, rel=1e-5), est
    x = torch.tensor([[21] + doc])
    with torch.no_grad():  # also on the whole interval [1e-3, 1]: one mask per block, weight w_1 = 1
        terms = nelbo_planned(model, x, seeded_generators([0]), Estimator("exact", 1))
    assert terms.sum().item() == pytest.approx(expect, rel=1e-5)


def test_scores_do_not_depend_on_batch_composition_or_order():
    model = random_model()
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 20, (n,), generator=gen).tolist() for n in (5, 40, 17, 3, 70)]
    for est in (Estimator("stratified", 6), Estimator("auto", 16)):
        together = score_documents(model, docs, bos_id=21, estimator=est, seed=9, batch_size=16)
        alone = torch.cat([score_documents(model, [d], bos_id=21, estimator=est, seed=9, batch_size=1) for d in docs])
        reversed_ = score_documents(model, docs[::-1], bos_id=21, estimator=est, seed=9, batch_size=2).flip(0)
        assert_close(together, alone, 0.0, f"{est} alone")
        assert_close(together, reversed_, 0.0, f"{est} reversed")


def test_the_same_seed_gives_the_same_draws_whatever_the_tokens():
    """Common random numbers: two sequences of one length and one seed are masked alike, so where their
    tokens agree (here the first two blocks; later blocks never change earlier ones) their terms are equal."""
    model = random_model(tiny_config(block_size=4, model_length=12))
    x = torch.randint(0, 20, (1, 12), generator=torch.Generator().manual_seed(4)).repeat(2, 1)
    x[1, 9:] = (x[1, 9:] + 1) % 20  # the second sequence differs in its last block only
    est = Estimator("stratified", 5)
    with torch.no_grad():
        same = nelbo_planned(model, x, seeded_generators([3, 3]), est)
        other = nelbo_planned(model, x, seeded_generators([3, 4]), est)
    assert torch.equal(same[0, :8], same[1, :8]) and not torch.equal(same[0, 8:], same[1, 8:])
    assert not torch.equal(other[0, :8], other[1, :8])


def test_bad_estimator_settings():
    with pytest.raises(ValueError, match="estimator must be one of"):
        Estimator("bogus", 4)
    with pytest.raises(ValueError, match="passes must be a positive integer, got 0"):
        Estimator("auto", 0)
    with pytest.raises(ValueError, match="mc_samples applies to the mc estimator only"):
        choose_estimator("stratified", None, 4)
    with pytest.raises(ValueError, match="disagree"):
        choose_estimator(None, 8, 4)
    assert choose_estimator(None, None, 4) == Estimator("mc", 4) and choose_estimator("mc", 4, 4) == Estimator("mc", 4)
    assert choose_estimator(None, None, None) == Estimator()
    with pytest.raises(ValueError, match="t-interval"):
        subset_weights(3, 0.5, 0.2)
