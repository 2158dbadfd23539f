import itertools

import numpy as np
import torch

from bd3_plugin.likelihood.nelbo import (draw_noise, nelbo_samples, nelbo_terms, noisy_logits_per_block,
    noisy_logits_vectorized)
from bd3_plugin.core.generators import seeded_generators
from helpers import ar_logprobs, assert_close, random_model, tiny_config


def test_vectorized_2l_pass_equals_per_block_loop():
    model = random_model()
    x = torch.randint(0, 20, (3, 30), generator=torch.Generator().manual_seed(0))
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[1, 25:] = False  # a right-padded row with a partial last block
    draw = draw_noise(x, valid, 4, model.config.mask_id, seeded_generators([1, 2, 3]), samples=1)
    with torch.no_grad():
        a = noisy_logits_vectorized(model, draw.x_t, x, valid)
        b = noisy_logits_per_block(model, draw.x_t, x, valid)
    assert_close(a[valid], b[valid], 1e-5, "2L vs loop")
    with torch.no_grad():
        ta = nelbo_terms(model, x, seeded_generators([1, 2, 3]), valid=valid, samples=2)
        tb = nelbo_terms(model, x, seeded_generators([1, 2, 3]), valid=valid, samples=2, vectorized=False)
    assert_close(ta, tb, 1e-4 * ta.abs().max().item(), "terms")
    assert (ta[1, 25:] == 0).all()


def test_block_size_one_at_full_masking_is_the_exact_ar_nll():
    model = random_model(tiny_config(block_size=1))
    x = torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(1))
    everything = torch.ones_like(x, dtype=torch.bool)
    with torch.no_grad():
        terms = nelbo_terms(model, x, seeded_generators([0, 1]), eligible=everything, eps_min=1.0, eps_max=1.0)
    exact = -torch.tensor([ar_logprobs(model, [], row.tolist()) for row in x], dtype=torch.float32)
    assert_close(terms, exact, 1e-4, "AR NLL")


def exact_expected_nelbo(model, x, eps=1e-3):
    """E_t E_mask[(1/t) Σ_masked −log p] for one block of n tokens, by enumerating all 2^n masks and
    integrating t^k (1−t)^(n−k) / t over [eps, 1] numerically."""
    n, mask_id = x.shape[1], model.config.mask_id
    grid = np.linspace(eps, 1.0, 20001)
    total = 0.0
    for pattern in itertools.product([False, True], repeat=n):
        m = torch.tensor(pattern)
        k = int(m.sum())
        if k == 0:
            continue
        xt = torch.where(m, torch.tensor(mask_id), x[0])[None]
        with torch.no_grad():
            logits = model(xt)[0].double()
        logits[:, mask_id] = -float("inf")
        nll = -torch.log_softmax(logits, -1).gather(-1, x[0][:, None]).squeeze(-1)
        weight = np.trapezoid(grid ** (k - 1) * (1 - grid) ** (n - k), grid)
        total += weight * nll[m].sum().item()
    return total / (1 - eps)  # t is uniform on [eps, 1]


def test_monte_carlo_nelbo_is_unbiased_against_exact_enumeration():
    model = random_model(tiny_config(block_size=4, model_length=4))
    x = torch.tensor([[3, 7, 1, 12]])
    everything = torch.ones_like(x, dtype=torch.bool)
    exact = exact_expected_nelbo(model, x)
    with torch.no_grad():
        per_sample = nelbo_samples(model, x, seeded_generators([7]), eligible=everything, samples=4000)
    totals = per_sample.sum(-1).double().flatten()
    stderr = totals.std().item() / np.sqrt(totals.numel())
    assert abs(totals.mean().item() - exact) < 4 * stderr + 1e-3, (totals.mean().item(), exact, stderr)


def test_scores_do_not_depend_on_the_batch():
    model = random_model()
    x = torch.randint(0, 20, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        batch = nelbo_terms(model, x, seeded_generators([10, 11, 12, 13]), samples=3)
        alone = nelbo_terms(model, x[2:3], seeded_generators([12]), samples=3)
    assert_close(batch[2:3], alone, 1e-5, "row 2")


def test_context_tokens_contribute_nothing():
    model = random_model()
    x = torch.randint(0, 20, (2, 32), generator=torch.Generator().manual_seed(3))
    eligible = torch.zeros_like(x, dtype=torch.bool)
    eligible[:, 18:] = True  # continuation starts inside block 4
    with torch.no_grad():
        terms = nelbo_terms(model, x, seeded_generators([0, 1]), eligible=eligible, samples=4)
    assert (terms[:, :18] == 0).all() and (terms[:, 18:] > 0).any()
