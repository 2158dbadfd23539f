import torch

from bd3_plugin.likelihood import scoring
from bd3_plugin.likelihood.scoring import document_windows, padded_length, report, score_documents, windows
from helpers import ar_logprobs, random_model, tiny_config


def test_windows_score_every_token_once_with_context():
    ids = list(range(100))
    wins = document_windows(ids, 32, bos_id=7)
    scored = [t for w in wins for t in w.ids[w.first :]]
    assert scored == ids
    assert wins[0].ids[0] == 7 and wins[0].first == 1
    assert all(len(w.ids) <= 32 for w in wins) and all(w.first >= 16 for w in wins[1:])
    assert document_windows([5, 6], 32, bos_id=None)[0].first == 0
    ctx = windows(list(range(50)), 45, 32)  # a long context is cut from the left, the continuation kept
    assert len(ctx) == 1 and ctx[0].ids == list(range(18, 50)) and ctx[0].first == 27


def test_block_size_one_scores_long_documents_exactly():
    """With L' = 1 the windowed bound is the exact AR NLL under each window's context."""
    model = random_model(tiny_config(block_size=1, model_length=16))
    doc = torch.randint(0, 20, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    total = score_documents(model, [doc], bos_id=21, mc_samples=1).item()
    expect = -sum(sum(ar_logprobs(model, w.ids[: w.first], w.ids[w.first :]))
                  for w in document_windows(doc, 16, bos_id=21))
    assert abs(total - expect) < 1e-3 * abs(expect)


def test_scores_do_not_depend_on_batching_or_neighbours(monkeypatch):
    """Bit for bit: each window is computed at a length set by itself alone (`padded_length`). Negative
    control: computed at another length, the same window's score moves (the kernels' summation order)."""
    model = random_model()
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 20, (n,), generator=gen).tolist() for n in (5, 40, 17, 3, 70, 33, 60)]
    all_at_once = score_documents(model, docs, bos_id=21, mc_samples=3, seed=9, batch_size=16)
    one_by_one = torch.cat([score_documents(model, [d], bos_id=21, mc_samples=3, seed=9, batch_size=1) for d in docs])
    reversed_ = score_documents(model, docs[::-1], bos_id=21, mc_samples=3, seed=9, batch_size=2).flip(0)
    assert torch.equal(all_at_once, one_by_one) and torch.equal(all_at_once, reversed_)
    assert (all_at_once[:, 0] != all_at_once[:, 1]).all()  # the samples differ
    monkeypatch.setattr(scoring, "padded_length", lambda n, max_length: n)  # each window at its own length
    unpadded = score_documents(model, docs, bos_id=21, mc_samples=3, seed=9, batch_size=16)
    assert torch.allclose(unpadded, all_at_once, rtol=1e-5) and not torch.equal(unpadded, all_at_once)


def test_padded_length_is_the_next_multiple_of_the_quantum_capped_by_the_model():
    assert scoring.PAD_QUANTUM == 16
    got = [padded_length(n, 100) for n in (1, 2, 15, 16, 17, 64, 65, 96, 97, 100)]
    assert got == [16, 16, 16, 16, 32, 64, 80, 96, 100, 100]


def test_report_pools_documents():
    per_doc = torch.tensor([[2.0, 4.0], [6.0, 8.0]], dtype=torch.float64)
    r = report(per_doc, tokens=4)
    assert r.nll_per_token == 2.5 and r.mc_samples == 2 and abs(r.mc_stderr - 0.5) < 1e-12
