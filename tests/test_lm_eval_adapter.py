"""The `bd3` lm-eval model type, through lm-eval's own Instance and CachingLM objects."""
import math

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import CachingLM
from lm_eval.api.registry import get_model

from bd3_plugin.likelihood.estimators import Estimator
from bd3_plugin.evals.lm_eval_adapter import BD3ArgsError, BD3EvalLM
from bd3_plugin.likelihood.scoring import report, score_documents
from bd3_plugin.tinyworld.grammar import Source, text_words
from bd3_plugin.tinyworld.data import HELDOUT, checkpoint_path, read_heldout
from helpers import ar_logprobs

HELDOUT_DOCS = read_heldout(HELDOUT)


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


@pytest.fixture(scope="module")
def lm4():
    return get_model("bd3").create_from_arg_string(f"pretrained={checkpoint_path(4)},mc_samples=2",
                                                   {"batch_size": 8, "device": None})


@pytest.fixture(scope="module")
def lm1():
    return BD3EvalLM(pretrained=str(checkpoint_path(1)), batch_size=8)


def test_block_size_one_gives_the_exact_ar_logprob(lm1):
    pairs = [("the old cow", " sleeps . <eos>"), ("", "a ship runs ."), ("some wolves", " follow the owl")]
    got = lm1.loglikelihood(ll_requests(pairs), disable_tqdm=True)
    for (ctx, cont), (ll, _) in zip(pairs, got):
        ctx_ids = lm1.tok_encode(ctx) or [lm1.eot_token_id]
        expect = sum(ar_logprobs(lm1.model, ctx_ids, lm1.tok_encode(cont)))
        assert math.isclose(ll, expect, rel_tol=1e-4), (ctx, cont, ll, expect)


def test_is_greedy_at_block_size_one_is_the_ar_argmax(lm1):
    ctx = lm1.tok_encode("the old cow")
    with torch.no_grad():
        logits = lm1.model(torch.tensor([ctx + [lm1.model.config.mask_id]]))[0, -1]
    logits[lm1.model.config.mask_id] = -float("inf")
    best, other = logits.argsort(descending=True)[:2].tolist()
    words = lm1.tokenizer.convert_ids_to_tokens([best, other])
    got = lm1.loglikelihood(ll_requests([("the old cow", " " + words[0]), ("the old cow", " " + words[1])]),
                            disable_tqdm=True)
    assert [g for _, g in got] == [True, False]


def test_bound_is_below_the_exact_logprob_on_average(lm4):
    docs = HELDOUT_DOCS[:120]
    got = lm4.loglikelihood(ll_requests([("", d.text + " <eos>") for d in docs]), disable_tqdm=True)
    mean_bound = sum(ll for ll, _ in got) / len(docs)
    mean_exact = sum(d.logprob for d in docs) / len(docs)
    per_doc = torch.tensor([ll - d.logprob for (ll, _), d in zip(got, docs)])
    assert mean_bound <= mean_exact + 3 * per_doc.std().item() / math.sqrt(len(docs))


def test_scores_do_not_depend_on_batch_or_order(lm4):
    pairs = [("", d.text + " <eos>") for d in HELDOUT_DOCS[:32]]
    target = ("the old cow", " sleeps near a barn .")
    alone = lm4.loglikelihood(ll_requests([target]), disable_tqdm=True)[0]
    in_batch = lm4.loglikelihood(ll_requests(pairs[:16] + [target] + pairs[16:]), disable_tqdm=True)[16]
    reversed_ = lm4.loglikelihood(ll_requests([target] + pairs[::-1]), disable_tqdm=True)[0]
    assert alone == pytest.approx(in_batch, rel=1e-6) and alone == pytest.approx(reversed_, rel=1e-6)


def test_rolling_adds_window_bounds(lm4):
    long_doc = " ".join(d.text for d in HELDOUT_DOCS[:30])  # several windows of 128 tokens
    ids = lm4.tok_encode(long_doc)
    assert len(ids) > 300
    got = lm4.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (long_doc,), 0)], disable_tqdm=True)[0]
    expect = -score_documents(lm4.model, [ids], bos_id=lm4.eot_token_id, mc_samples=2, seed=1234).mean().item()
    assert got == pytest.approx(expect, rel=1e-6)


def test_generation_is_seeded_batched_and_stops(lm4):
    reqs = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 40}), i)
            for i, p in enumerate(["the old cow", "some ships", "a wolf"])]
    out = lm4.generate_until(reqs, disable_tqdm=True)
    again = lm4.generate_until(reqs[1:2], disable_tqdm=True)
    assert out[1] == again[0] and all("." not in o for o in out)
    source = Source()
    assert sum(source.is_valid(text_words(r.args[0] + " " + o + " .")) for r, o in zip(reqs, out)) >= 2


def test_unsupported_generation_arguments_are_refused_not_ignored(lm4):
    req = lambda kw: [Instance("generate_until", {}, ("the old cow", {"until": ["."], "max_gen_toks": 4} | kw), 0)]
    for kw, needle in [({"num_beams": 4}, "num_beams"), ({"repetition_penalty": 1.3}, "repetition_penalty"),
                       ({"temperature": -1.0}, "temperature")]:
        with pytest.raises(ValueError, match=needle):
            lm4.generate_until(req(kw), disable_tqdm=True)
    plain = lm4.generate_until(req({}), disable_tqdm=True)
    assert lm4.generate_until(req({"num_beams": 1, "repetition_penalty": 1.0}), disable_tqdm=True) == plain


def test_top_k_from_the_task_or_the_model_args_reaches_the_sampler(lm1):
    """At L' = 1, top_k = 1 at temperature 1 is greedy decoding: the task's top_k is applied."""
    prompts = ["the old cow", "some ships", "a wolf"]

    def run(gen_kwargs):
        reqs = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 12} | gen_kwargs), i)
                for i, p in enumerate(prompts)]
        return lm1.generate_until(reqs, disable_tqdm=True)

    greedy = run({"temperature": 0.0})
    assert run({"temperature": 1.0, "do_sample": True, "top_k": 1}) == greedy
    assert run({"temperature": 1.0, "do_sample": True}) != greedy  # the comparison above can fail
    assert lm1._sampler_config({"top_k": None})[0].top_k == lm1.args.top_k == 0
    lm = BD3EvalLM.create_from_arg_string(f"pretrained={checkpoint_path(1)},top_k=3,batch_size=4")
    assert lm._sampler_config({})[0].top_k == 3 and lm._sampler_config({"top_k": 1})[0].top_k == 1


def test_bad_requests(lm4):
    with pytest.raises(ValueError, match="empty continuation"):
        lm4.loglikelihood(ll_requests([("the cow", "")]), disable_tqdm=True)
    long_ctx = " ".join(["the old cow sleeps ."] * 40)  # 200 tokens > model_length 128
    with pytest.warns(UserWarning, match="does not fit beside its continuation in model_length 128"):
        ll = lm4.loglikelihood(ll_requests([(long_ctx, " the cow sleeps .")]), disable_tqdm=True)[0][0]
    tail = lm4.tokenizer.decode(lm4.tok_encode(long_ctx)[-(128 - 4):])  # documented: the context's last tokens
    assert ll == pytest.approx(lm4.loglikelihood(ll_requests([(tail, " the cow sleeps .")]), disable_tqdm=True)[0][0])
    for args, needle in [("mc_sample=2", "unknown key(s) mc_sample"), ("mc_samples=0", "mc_samples must be"),
                         ("estimator=bogus", "estimator must be one of"), ("passes=0", "passes must be a positive"),
                         ("estimator=stratified,mc_samples=4", "mc_samples applies to the mc estimator only"),
                         ("estimator=exact,passes=14", "exact needs 15 passes for a block of 4"),
                         ("algorithm=beam", "algorithm must be one of"), ("top_k=-1", "top_k must be an integer >= 0"),
                         ("block_size=5", "block_size 5 does not divide"),
                         ("", "pretrained=PATH_OR_HUB_ID is required")]:
        arg_string = f"pretrained={checkpoint_path(4)},{args}" if "pretrained" not in needle else args
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            BD3EvalLM.create_from_arg_string(arg_string)
    assert issubclass(BD3ArgsError, ValueError)


def test_use_cache_resumes_a_killed_run(tmp_path, lm4, monkeypatch):
    pairs = [("", d.text + " <eos>") for d in HELDOUT_DOCS[:100]]  # two chunks of 64
    calls = []
    real = BD3EvalLM._score

    def dying(self, wins, n, seeds=None):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while the second chunk is scored
        return real(self, wins, n, seeds)

    monkeypatch.setattr(BD3EvalLM, "_score", dying)
    cached = CachingLM(lm4, str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):
        cached.loglikelihood(ll_requests(pairs))
    calls.clear()
    monkeypatch.setattr(BD3EvalLM, "_score", lambda self, wins, n, seeds=None: (calls.append(n),
                                                                               real(self, wins, n, seeds))[1])
    resumed = CachingLM(lm4, str(tmp_path / "cache")).loglikelihood(ll_requests(pairs))
    assert calls == [36]  # only the requests the killed run had not finished
    assert resumed == lm4.loglikelihood(ll_requests(pairs), disable_tqdm=True)


@pytest.fixture(scope="module")
def lm16():
    return BD3EvalLM(pretrained=str(checkpoint_path(16)), batch_size=8, greedy_check=False)


def test_the_default_estimator_plans_passes_within_the_budget(lm16, monkeypatch):
    """auto/16: the L' = 16 checkpoint's blocks are too large to enumerate, so each request gets a
    stratified plan of at most 16 passes, and the same request scores the same in any batch."""
    import bd3_plugin.likelihood.nelbo as nelbo

    assert lm16.args.scorer == Estimator() == Estimator("auto", 16)
    plans = []
    real = nelbo.row_plan
    monkeypatch.setattr(nelbo, "row_plan", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    pairs = [("", d.text + " <eos>") for d in HELDOUT_DOCS[:6]]
    got = lm16.loglikelihood(ll_requests(pairs), disable_tqdm=True)
    assert len(plans) == 6 and all(0 < p.masks.shape[0] <= 16 for p in plans)
    again = lm16.loglikelihood(ll_requests(pairs[3:4] + pairs[:3][::-1]), disable_tqdm=True)
    assert again[0] == got[3] and again[1:] == got[:3][::-1]


def test_choices_of_one_context_share_their_draws(lm16, monkeypatch):
    """Common random numbers: continuations of one context are masked alike, whatever their tokens; a
    different context draws anew. Identical choices score the same."""
    import bd3_plugin.likelihood.nelbo as nelbo

    a, b = "the old cow sleeps near a barn .", "a barn sleeps near the old cow ."  # of equal length
    assert len(lm16.tok_encode(" " + a)) == len(lm16.tok_encode(" " + b))
    plans = []
    real = nelbo.row_plan
    monkeypatch.setattr(nelbo, "row_plan", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    got = lm16.loglikelihood(ll_requests([("a ship", " " + a), ("a ship", " " + b), ("the owl", " " + a),
                                          ("a ship", " " + a)]), disable_tqdm=True)
    first, second, other, again = (p.masks for p in plans)  # requests of equal length keep their order
    assert torch.equal(first, second) and torch.equal(first, again) and not torch.equal(first, other)
    assert got[0] == got[3] and got[0] != got[1]


def test_registering_bd3_keeps_lm_evals_own_model_types():
    """lm-eval loads its own model types only into an empty registry: with the adapter imported, get_model
    still finds them (and bd3)."""
    from lm_eval.api.registry import model_registry

    assert {"bd3", "hf", "local-completions", "vllm"} <= set(model_registry.keys())
    assert get_model("bd3") is BD3EvalLM
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"
