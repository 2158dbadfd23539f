"""A sampler registered from outside the package, here and nowhere else, runs through every engine that takes
a sampler by name: `generate` (with its recorder and the RL scorer), the lm-eval adapter and the vLLM engine.

The toy sampler, "leftmost", reveals the leftmost masked slot of each row per pass. Its tokens have an
independent definition: token n is taken from the logits at position n of one full forward over the
sequence so far followed by masks to the end of n's block (the argmax, or at temperature > 0 the Gumbel
draw from one row of uniforms of the row's generator). The vLLM part runs in the session's engine process
(tests/vllm_sampler_worker.py), which registers the toy sampler there for the job, with the engine in that
process.
"""
from types import SimpleNamespace

import pytest
import torch

from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.sampling.config import ALGORITHMS, SamplerConfig
from bd3_plugin.sampling.generate import generate
from bd3_plugin.sampling.registry import Sampler, register_sampler, sampler_names, unregister_sampler
from bd3_plugin.sampling.samplers import StepResult, draw_tokens, token_probs
from helpers import assert_close, random_model

NAME = "leftmost"
PROMPTS = [[], [3], [4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9]]  # inside a block and on its edge (L' = 4)


class Leftmost(Sampler):
    """One token per pass, at the leftmost masked slot: the argmax at temperature 0, else drawn from the
    filtered p_θ with one row of uniforms from the row's generator. The position is a function of the state,
    so the default (deterministic) selection terms hold."""

    def read(self, masked, generators):
        return masked & (masked.long().cumsum(dim=1) == 1)

    def step(self, logits, masked, read, generators, grid, t, s, with_probs=False):
        probs = token_probs(logits[read], **self.filters)  # (n, V), rows in order
        uniforms = None
        if not self.greedy and len(probs):
            rows = read.any(dim=1).tolist()
            uniforms = torch.cat([torch.rand(1, probs.shape[-1], generator=g, dtype=torch.float64)
                                  for g, live in zip(generators, rows) if live]).to(probs.device)
        tokens = torch.zeros_like(read, dtype=torch.long)
        tokens[read] = draw_tokens(probs, uniforms)
        return StepResult(read, tokens, read, probs) if with_probs else StepResult(read, tokens)


@pytest.fixture
def leftmost():
    register_sampler(NAME)(Leftmost)
    yield NAME
    unregister_sampler(NAME)


def naive_leftmost(model, prompt: list[int], n_new: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
    """No cache, no batch, no sampler: one full forward per token over the sequence and masks to the end of
    the token's block."""
    size, mask_id = model.config.block_size, model.config.mask_id
    gen, seq = torch.Generator().manual_seed(seed), list(prompt)
    for _ in range(n_new):
        ids = seq + [mask_id] * (size - len(seq) % size)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, len(seq)].double()
        logits[mask_id] = -float("inf")
        if temperature == 0:
            seq.append(int(logits.argmax()))
            continue
        q = torch.softmax(logits / temperature, -1)
        u = torch.rand(len(q), generator=gen, dtype=torch.float64)
        seq.append(int((q / (1e-10 - torch.log(u + 1e-10))).argmax()))
    return seq[len(prompt):]


def test_only_registered_names_are_accepted_and_the_fixture_leaves_none_behind():
    assert NAME not in sampler_names() and NAME not in ALGORITHMS
    with pytest.raises(ValueError, match=f"algorithm must be one of first_hitting, ddpm, threshold, got '{NAME}'"):
        SamplerConfig(algorithm=NAME)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        SamplerConfig(algorithm=["ddpm"])  # a request's JSON may hold anything


def test_a_sampler_registered_later_is_taken_wherever_a_name_is_checked(leftmost):
    from bd3_plugin.cli.main import build_parser
    from bd3_plugin.evals.genppl import sampler_config as genppl_config
    from vllm_backend.worker.params import sampler_config as vllm_config

    assert sampler_names()[-1] == NAME and ALGORITHMS[-1] == NAME  # after the built-in ones
    with pytest.raises(ValueError, match="already registered"):
        register_sampler(NAME)(Leftmost)
    assert SamplerConfig(algorithm=NAME).algorithm == NAME
    assert build_parser().parse_args(["sample", "ckpt", "--algorithm", NAME]).algorithm == NAME
    assert genppl_config("paper", algorithm=NAME).steps is None  # the preset's DDPM grid is dropped
    params = SimpleNamespace(extra_args={"algorithm": NAME}, temperature=0.0, top_k=-1, top_p=1.0, max_tokens=5)
    assert vllm_config(params, 4) == SamplerConfig(algorithm=NAME, max_new_tokens=5, temperature=0.0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_equals_the_naive_loop_and_the_record_replays(leftmost, temperature):
    from bd3_plugin.rl.trajectory_scoring import score_trajectory

    model, n = random_model(), 11
    cfg = SamplerConfig(algorithm=leftmost, temperature=temperature, max_new_tokens=n)
    out = generate(model, PROMPTS, cfg, seeded_generators(range(4)), record=True)
    for row, (prompt, g) in enumerate(zip(PROMPTS, out.generations)):
        assert g.tokens == naive_leftmost(model, prompt, n, temperature, seed=row), (temperature, prompt)
        assert g.reveal_steps == list(range(1, n + 1))  # one token per pass, left to right
    for t, sc in zip(out.trajectories, score_trajectory(model, out.trajectories)):
        assert (t.steps.n_revealed == 1).all() and (t.steps.logprob_select == 0).all()
        assert_close(sc.logprob.detach(), t.logprob, 1e-5, "replayed log-probs")
        assert_close(sc.step_logprob_select.detach(), t.steps.logprob_select, 0.0, "selection")


def test_lm_eval_generate_until_equals_the_naive_loop(leftmost):
    from lm_eval.api.instance import Instance

    from bd3_plugin.evals.lm_eval_adapter import BD3EvalLM
    from bd3_plugin.tinyworld.data import checkpoint_path

    lm = BD3EvalLM(pretrained=str(checkpoint_path(4)), algorithm=leftmost, batch_size=2)
    contexts = ["the old cow", "some ships", "a wolf sees"]
    reqs = [Instance("generate_until", {}, (c, {"until": ["."], "max_gen_toks": 14}), i)
            for i, c in enumerate(contexts)]
    got = lm.generate_until(reqs, disable_tqdm=True)
    for c, text in zip(contexts, got):
        tokens = naive_leftmost(lm.model, [lm.eot_token_id] + lm.tok_encode(c), 14)
        tokens = tokens[: tokens.index(lm.eot_token_id)] if lm.eot_token_id in tokens else tokens
        assert text == lm.tok_decode(tokens).split(".", 1)[0], c


@pytest.mark.engine
def test_the_vllm_engine_equals_the_naive_loop(engines):
    from bd3_plugin.core.checkpoint import load_checkpoint
    from bd3_plugin.tinyworld.data import checkpoint_path

    ckpt = load_checkpoint(checkpoint_path(4))
    prompts = [ckpt.encode(t) for t in ("<eos> the old cow", "<eos> some ships run . a", "<eos>")]
    cases = [{"temperature": 0.0, "max_tokens": 13, "seed": 0}, {"temperature": 1.0, "max_tokens": 10, "seed": 7}]
    # In the session's engine process (tests/vllm_sampler_worker.py), with the engine in that process.
    results = engines.run("sampler", {"checkpoint": str(checkpoint_path(4)), "prompts": prompts, "cases": cases},
                          env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    for case, outputs in zip(cases, results):
        for i, (prompt, tokens) in enumerate(zip(prompts, outputs)):
            want = naive_leftmost(ckpt.model, prompt, case["max_tokens"], case["temperature"], case["seed"] + i)
            assert tokens == want, (case, prompt)
