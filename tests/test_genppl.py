"""Generative perplexity: the rejection rule, the sliding window, and `bd3 genppl` end to end with the exact
source and with a small Hugging Face causal LM, each against an independent computation."""
import dataclasses
import json
import math
import random

import pytest
import torch

from bd3_plugin.evals.causal_scoring import CausalLMScorer, sliding_windows
from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.cli.main import main
from bd3_plugin.evals.genppl import GenPPLConfig, draw_samples, rejected, sampler_config
from bd3_plugin.likelihood.scoring import content_seed
from bd3_plugin.tinyworld.data import checkpoint_path
from bd3_plugin.tinyworld.grammar import EOS, Source, build_tokenizer


def entropy(tokens) -> float:
    _, counts = torch.unique(torch.tensor(tokens), return_counts=True)
    return float(torch.special.entr(counts.double() / counts.sum()).sum())


def reference_rejects(ids, block, threshold, window) -> bool:
    """The reference's loop: the sample grows a block at a time; once longer than the window, a low
    entropy of its last `window` tokens ends the draw."""
    for n in range(block, len(ids) + 1, block):
        x = ids[:n]
        if len(x) > window and entropy(x[-window:]) < threshold:
            return True
    return False


def test_rejection_rule_matches_the_references_loop():
    rng = random.Random(0)
    for trial in range(300):
        block, window = rng.choice([1, 2, 4]), rng.choice([4, 8, 12])
        n = block * rng.randint(1, 10)
        vocab = rng.choice([2, 3, 20])
        ids = [rng.randrange(vocab) for _ in range(n)]
        if trial % 3 == 0:  # a repetitive stretch somewhere
            at = rng.randrange(n)
            ids[at:] = [ids[at]] * (n - at)
        threshold = rng.choice([0.5, 1.0, 2.0])
        assert rejected(ids, block, threshold, window) == reference_rejects(ids, block, threshold, window)


@pytest.mark.parametrize("n,context,stride", [(1, 8, 4), (2, 8, 4), (8, 8, 4), (9, 8, 4), (30, 8, 3), (31, 8, 8)])
def test_sliding_window_scores_each_position_once_with_the_references_context(n, context, stride):
    wins = sliding_windows(n, context, stride)
    scored = [p for s, e, f in wins for p in range(f, e)]
    assert scored == list(range(1, n))
    for s, e, f in wins:
        assert e - s <= context
        for p in range(f, e):  # the reference: window i = ⌊(p − C)/S⌋ + 1 starts at i·S
            assert s == (0 if p < context else ((p - context) // stride + 1) * stride)


def test_preset_paper_and_overrides():
    paper = sampler_config("paper")
    assert (paper.algorithm, paper.top_p, paper.temperature, paper.steps) == ("first_hitting", 0.9, 1.0, None)
    assert sampler_config("paper", algorithm="ddpm").steps == 5000
    assert sampler_config("paper", algorithm="ddpm", steps=7).steps == 7
    assert sampler_config(None).top_p == 1.0 and sampler_config(None, top_p=0.5).top_p == 0.5
    with pytest.raises(ValueError, match="unknown preset"):
        sampler_config("fast")


def prefix_prob(source: Source, words) -> float:
    """p(a document starts with `words`) by summing over the automaton's paths, independently of the
    forward algorithm."""
    def rec(state, i):
        if i == len(words):
            return 1.0
        return sum(p * rec(n, i + 1) for tok, p, n in source.transitions(state) if tok == words[i] and p > 0)
    return sum(p0 * rec(s, 0) for p0, s in source.initial())


def exact_sample_nll(source: Source, text: str):
    """(Σ −log p over the non-EOS tokens, their count), or None if some token is impossible."""
    words = text.split()
    assert words[0] == EOS
    nll, count, doc = 0.0, 0, []
    for w in words[1:]:
        before, doc = prefix_prob(source, doc), doc + [w]
        after = prefix_prob(source, doc)
        if after == 0:
            return None
        if w != EOS:
            nll, count = nll - math.log(after / before), count + 1
        else:
            doc = []
    return nll, count


def test_stream_logprobs_add_up_to_each_documents_exact_probability():
    from bd3_plugin.tinyworld.grammar import corpus
    from bd3_plugin.tinyworld.stream import document_validity, stream_logprobs

    source = Source()
    docs = corpus(5, seed=2, source=source)
    words = [EOS] + [w for d in docs for w in d]
    lps = stream_logprobs(source, words)
    at = 0
    for d in docs:
        assert sum(lps[at : at + len(d)]) == pytest.approx(source.log_prob(d), abs=1e-9)
        at += len(d)
    broken = [EOS, "the", "the", "cow", EOS] + docs[0]
    lps = stream_logprobs(source, broken)
    # lps[i] scores broken[i + 1]: "the" is fine, a second "the" is impossible, the rest of that document
    # has no probability, and the next document is scored afresh.
    assert lps[0] > -math.inf and lps[1] == -math.inf and lps[2] is None and lps[3] is None
    assert sum(lps[4:]) == pytest.approx(source.log_prob(docs[0]), abs=1e-9) and len(lps) == 4 + len(docs[0])
    assert document_validity(broken, lps) == (1, 2)


def test_genppl_with_the_source_scorer_gives_the_exact_nll(tmp_path, capsys):
    out_file = tmp_path / "samples.jsonl"
    rc = main(["genppl", str(checkpoint_path(4)), "--scorer", "source", "--preset", "paper", "--num-samples", "6",
               "--batch-size", "4", "--entropy-window", "64", "--entropy-threshold", "2.5", "--seed", "3",
               "--samples-out", str(out_file), "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    source = Source()
    assert len(rows) == 6 and report["samples"] == 6 and report["length"] == 128
    for row, ppl in zip(rows, report["per_sample_ppl"]):
        words = row["text"].split()
        assert len(words) == 128 and words[0] == EOS
        exact = exact_sample_nll(source, row["text"])
        assert row["valid"] == (exact is not None)
        if exact is not None:
            assert row["nll"] == pytest.approx(exact[0], rel=1e-9) and row["tokens"] == exact[1]
            assert ppl == pytest.approx(math.exp(exact[0] / exact[1]), rel=1e-9)
    assert sum(r["valid"] for r in rows) >= 2  # the exact comparison above did run
    finite = [p for p in report["per_sample_ppl"] if math.isfinite(p)]
    assert report["valid_fraction"] == len(finite) / 6
    assert report["gen_ppl"] == pytest.approx(sum(report["per_sample_ppl"]) / 6)
    assert report["mean_nfe"] == 127  # first-hitting: one pass per generated token
    assert report["sampler"]["top_p"] == 0.9 and report["sampler"]["stop_at_eos"] is False


def test_rejected_draws_are_redrawn_and_the_kept_ones_pass():
    ckpt = load_checkpoint(checkpoint_path(4))
    bos = ckpt.tokenizer.bos_token_id
    sampler = sampler_config(None)  # top-p 1: diverse enough that a tight threshold rejects some draws
    cfg = GenPPLConfig(length=64, num_samples=8, batch_size=8, entropy_threshold=3.05, entropy_window=48,
                       max_tries=3, seed=5)
    draws = draw_samples(ckpt.model, bos, sampler, cfg)
    assert sum(draws.tries) > 8, "the threshold should reject some draws; pick another seed"
    gen_cfg = dataclasses.replace(sampler, max_new_tokens=63, stop_at_eos=False)
    from bd3_plugin.sampling.generate import generate
    from bd3_plugin.core.generators import seeded_generators

    for i, (ids, tries) in enumerate(zip(draws.samples, draws.tries)):
        assert len(ids) == 64 and ids[0] == bos
        assert not rejected(ids, 4, 3.05, 48) or tries == 3  # only an exhausted sample keeps a bad draw
        for k in range(tries - 1):  # every earlier draw, regenerated from its seed, was rejected
            g = generate(ckpt.model, [[bos]], gen_cfg, seeded_generators([content_seed(5, i, k)])).generations[0]
            assert reference_rejects([bos] + g.tokens, 4, 3.05, 48)
    everything = draw_samples(ckpt.model, bos, sampler, GenPPLConfig(
        length=64, num_samples=3, entropy_threshold=50.0, entropy_window=16, max_tries=2))
    assert everything.tries == [2, 2, 2] and everything.exhausted == 3


def test_genppl_with_a_local_causal_lm_matches_a_naive_per_sample_computation(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=24, n_embd=32, n_layer=2, n_head=2,
                                    bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()
    lm.save_pretrained(tmp_path)
    out_file = tmp_path / "samples.jsonl"
    rc = main(["genppl", str(checkpoint_path(4)), "--scorer", str(tmp_path), "--num-samples", "3", "--length",
               "64", "--stride", "10", "--entropy-threshold", "0", "--samples-out", str(out_file), "--json"])
    assert rc == 0
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    eos = tok.eos_token_id
    for row in rows:
        ids = tok(row["text"])["input_ids"]
        assert len(ids) == 64 and ids[0] == eos
        nll, count = 0.0, 0
        for p in range(1, len(ids)):
            if ids[p] == eos:
                continue
            start = 0 if p < 24 else ((p - 24) // 10 + 1) * 10
            with torch.no_grad():
                logits = lm(torch.tensor([ids[start : p + 1]])).logits[0, -2].double()
            nll -= torch.log_softmax(logits, -1)[ids[p]].item()
            count += 1
        assert row["tokens"] == count and row["nll"] == pytest.approx(nll, rel=1e-5)
        assert row["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["--scorer", "/nonexistent/scorer"], "cannot load the scorer"),
    (["--scorer", "source", "--length", "126"], "not a multiple of the block size"),
    (["--scorer", "source", "--length", "1"], "length must be at least 2"),
    (["--scorer", "source", "--num-samples", "0"], "num_samples must be a positive integer"),
    (["--scorer", "source", "--top-p", "1.5"], "top_p must lie in"),
    (["--scorer", "source", "--stride", "8"], "--stride sets a causal LM scorer's"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["genppl", str(checkpoint_path(4)), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("bd3 genppl: error:")


def test_a_missing_checkpoint_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["genppl", "/nonexistent/checkpoint", "--scorer", "source"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bd3 genppl: error:")
