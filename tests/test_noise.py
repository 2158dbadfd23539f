import torch

from bd3_plugin.likelihood.noise import mask_tokens, sample_t
from bd3_plugin.core.subs import subs_log_probs


def test_antithetic_t_takes_one_stratum_each():
    t = sample_t(8, 3, torch.Generator().manual_seed(0), eps_min=0.0, eps_max=1.0)
    strata = (t.flatten().double() * 24).floor().long().sort().values
    assert torch.equal(strata, torch.arange(24))


def test_each_block_t_is_marginally_uniform():
    """Strata are dealt out at random: block 0 is not stuck in the lowest stratum."""
    firsts = torch.stack([sample_t(16, 1, torch.Generator().manual_seed(s))[0, 0] for s in range(2000)])
    assert abs(firsts.mean().item() - 0.5) < 0.03
    assert ((firsts < 0.25).float().mean() - 0.25).abs() < 0.04


def test_t_interval():
    t = sample_t(10, 10, torch.Generator().manual_seed(1), eps_min=0.3, eps_max=0.8)
    assert t.min() >= 0.3 and t.max() <= 0.8
    assert torch.equal(sample_t(4, 2, torch.Generator(), eps_min=1.0, eps_max=1.0), torch.ones(2, 4))


def test_masking_rate_and_eligibility():
    x = torch.zeros(200, 100, dtype=torch.long)
    eligible = torch.ones_like(x, dtype=torch.bool)
    eligible[:, :10] = False
    xt = mask_tokens(x, torch.full(x.shape, 0.3), eligible, 9, torch.Generator().manual_seed(2))
    assert not (xt[:, :10] == 9).any()
    assert abs((xt[:, 10:] == 9).float().mean().item() - 0.3) < 0.01


def test_subs_log_probs():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(3))
    xt = torch.tensor([[6, 1, 6, 2, 6], [0, 6, 6, 6, 3]])
    logp = subs_log_probs(logits, xt, mask_id=6)
    masked = xt == 6
    assert (logp[masked][:, 6] < -1e5).all()  # the mask is never predicted
    assert torch.allclose(logp[masked].exp().sum(-1), torch.ones(int(masked.sum())))
    kept = logp[~masked]
    assert torch.equal(kept.gather(-1, xt[~masked][:, None]).squeeze(-1), torch.zeros(int((~masked).sum())))
    assert (kept.exp().sum(-1) == 1).all()  # carry-over: a one-hot at the observed token
