"""Trajectories and logprobs from the vLLM engine against the core's recorded rollouts and its scorer.

One offline engine per mode in the session's engine process (tests/vllm_traces_worker.py; the engine in that
process, and once in its own processes) and the session's `bd3 serve`, which has `--logprobs-mode
processed_logprobs`.
"""
import json

import pytest
import requests
import torch

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.sampling.config import SamplerConfig
from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.tinyworld.data import checkpoint_path
from bd3_plugin.sampling.trajectory import Trajectory
from bd3_plugin.rl.trajectory_scoring import score_trajectory
from engines import L4_OWN_PROCESSES
from helpers import assert_close
# Prompt lengths 4, 6, 1, 12 at L' = 4: on a block boundary and inside a block.
TEXTS = ["<eos> the old cow", "<eos> some ships run . a", "<eos>", "<eos> the wolf sees a fox . many owls sleep . the"]
# max_tokens never a multiple of L' (rows stop inside a block); EOS is left on (rows stop at it too).
CASES = [
    {"temperature": 1.0, "max_tokens": 10, "seed": 5, "extra_args": {"algorithm": "first_hitting"}},
    {"temperature": 0.8, "top_p": 0.9, "max_tokens": 22, "seed": 7, "n": 3,
     "extra_args": {"algorithm": "ddpm", "steps": 6}},
    {"temperature": 0.9, "top_k": 4, "top_p": 0.95, "max_tokens": 13, "seed": 3,
     "extra_args": {"algorithm": "threshold", "threshold": 0.5}},
    {"temperature": 0.0, "max_tokens": 9, "seed": 1, "extra_args": {"algorithm": "threshold", "threshold": 0.5}},
]


@pytest.fixture(scope="module")
def ckpt():
    return load_checkpoint(checkpoint_path(4))


def run_engine(engines, spec, multiprocess=False):
    return engines.run("traces", spec, env={"OMP_NUM_THREADS": "1",
                                            "VLLM_ENABLE_V1_MULTIPROCESSING": str(int(multiprocess))})


@pytest.fixture(scope="module")
def engine(engines, ckpt):
    prompts = [ckpt.encode(t) for t in TEXTS]
    return prompts, run_engine(engines, {"checkpoint": str(checkpoint_path(4)), "prompts": prompts, "cases": CASES,
                                         "greedy": True})


def core_config(case) -> SamplerConfig:
    xargs = case["extra_args"]
    return SamplerConfig(algorithm=xargs["algorithm"], max_new_tokens=case["max_tokens"],
                         temperature=case["temperature"], top_p=case.get("top_p", 1.0), top_k=case.get("top_k", 0),
                         steps=xargs.get("steps"), threshold=xargs.get("threshold", 0.9))


def core_trajectories(ckpt, prompts, case, choice):
    """The core's record of the same request: vLLM seeds choice i with seed + i."""
    gens = seeded_generators([case["seed"] + choice] * len(prompts))
    return generate(ckpt.model, prompts, core_config(case), gens, eos_id=ckpt.eos_id, record=True).trajectories


# vLLM's paged CPU attention and the core's attention add in different orders: their float32 logits differ
# by up to ~1e-5 late in a 34-token sequence (measured worst: 1.4e-5 against `generate`, 1.3e-5 against
# `score_trajectory`, one slot at position 28; most slots within 2e-6). Engine values are compared at 2e-5;
# the core's own record against its scorer holds 1e-5 (tests/test_trajectory.py).
ENGINE_ATOL = 2e-5


def assert_same_trajectory(e: Trajectory, c: Trajectory, what: str) -> None:
    assert e.prompt == c.prompt and e.output == c.output, what
    for f in ("tokens", "reveal_pass", "reveal_step", "reveal_grid", "in_output"):
        assert torch.equal(getattr(e, f), getattr(c, f)), (what, f)
    for f in ("logprob", "logprob_raw", "entropy"):
        assert_close(getattr(e, f), getattr(c, f), ENGINE_ATOL, f"{what} {f}")
    for f in ("block", "pass_index", "step", "grid", "n_masked", "n_revealed", "select_known"):
        assert torch.equal(getattr(e.steps, f), getattr(c.steps, f)), (what, f)
    for f in ("logprob_tokens", "logprob_select", "entropy_mean"):
        assert_close(getattr(e.steps, f).nan_to_num(0), getattr(c.steps, f).nan_to_num(0), ENGINE_ATOL,
                     f"{what} {f}")
    assert (e.seed, e.seed_drawn, e.sampler, e.denoise_passes) == (c.seed, c.seed_drawn, c.sampler, c.denoise_passes)
    assert e.finish_reason == c.finish_reason, what


@pytest.mark.engine
def test_engine_trajectories_equal_the_core_and_the_scorer(engine, ckpt):
    prompts, results = engine
    ends = set()
    for case, got in zip(CASES, results["cases"]):
        for choice in range(case.get("n", 1)):
            core = core_trajectories(ckpt, prompts, case, choice)
            for p, c in enumerate(core):
                e = Trajectory.from_json(got["trajectories"][p][choice])
                what = f"{case['extra_args']} choice {choice} prompt {len(prompts[p])}"
                assert_same_trajectory(e, c, what)
                scores = score_trajectory(ckpt.model, [e])[0]
                for f in ("logprob", "logprob_raw", "entropy"):
                    assert_close(getattr(scores, f).detach(), getattr(e, f), ENGINE_ATOL, f"{what} scored {f}")
                tail = int(((e.reveal_pass > 0) & ~e.in_output).sum())
                ends.add((e.finish_reason, tail > 0))
                # recording draws nothing: a plain request gives the same tokens (vLLM adds the EOS it stopped at)
                plain = got["token_ids"][p][choice]
                assert plain[: len(e.output)] == e.output and len(plain) - len(e.output) == (e.finish_reason == "eos")
    assert {("eos", True), ("length", True)} <= ends  # rows stopped inside a block, by EOS and by the limit


@pytest.mark.engine
def test_n_choices_are_distinct_and_reproducible(engine):
    _, results = engine
    n_case = results["cases"][1]
    for row in n_case["trajectories"]:
        outputs = [tuple(Trajectory.from_json(t).output) for t in row]
        seeds = [t["seed"] for t in row]
        assert seeds == [7, 8, 9] and len(set(outputs)) == 3


@pytest.mark.engine
def test_raw_logprobs_are_the_trajectory_values_with_the_model_top_alternatives(engine, ckpt):
    """vLLM's default raw_logprobs: each token's entry is its raw reveal-time log-prob, and the top 3 are those
    of the model's full distribution at the reveal pass, recomputed by the core's scorer."""
    _, results = engine
    case, got = CASES[0], results["cases"][0]
    for p, row in enumerate(got["trajectories"]):
        e = Trajectory.from_json(row[0])
        steps = sorted({(int(b), int(q)) for b, q in zip(e.block[e.reveal_pass > 0], e.reveal_pass[e.reveal_pass > 0])})
        full = score_trajectory(ckpt.model, [e], full_vocab=[steps])[0].full_logprobs
        tokens, logprobs = got["token_ids"][p][0], got["logprobs"][p][0]
        assert len(logprobs) == len(tokens)
        generated = (e.reveal_pass > 0).nonzero()[:, 0].tolist()
        for k, (tok, entry) in enumerate(zip(tokens, logprobs)):
            i = generated[k]
            assert abs(entry[str(tok)][0] - e.logprob_raw[i].item()) < 1e-5
            b, q = int(e.block[i]), int(e.reveal_pass[i])
            at = ((e.block == b) & (e.reveal_pass == q)).nonzero()[:, 0].tolist()
            dist = full[(b, q)][at.index(i)].detach()
            top = dist.topk(3)
            others = {int(t): v for t, v in entry.items() if int(t) != tok or v[1] <= 3}
            assert sorted(others) == sorted(top.indices.tolist()), (k, entry)
            for r, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                assert abs(others[t][0] - v) < 1e-5 and others[t][1] == r + 1
            assert entry[str(tok)][1] == int((dist >= dist[tok] - 1e-6).sum())  # the rank, vLLM's way


@pytest.mark.engine
def test_trajectory_true_without_the_middleware_is_refused(engine):
    _, results = engine
    assert results["refusal"].startswith("vllm_xargs bd3_trajectory: true needs the trace middleware")
    assert "\n" not in results["refusal"]


@pytest.mark.engine
def test_engine_in_its_own_processes_gives_the_same_trajectories(engines, engine, ckpt):
    prompts, results = engine
    mp = run_engine(engines, {"checkpoint": str(checkpoint_path(4)), "prompts": prompts[:2], "cases": CASES[1:2],
                              "keep": L4_OWN_PROCESSES}, multiprocess=True)  # test_vllm_weights.py uses it too
    for p in range(2):
        for choice in range(3):
            here = Trajectory.from_json(results["cases"][1]["trajectories"][p][choice])
            # a batch of 2 prompts instead of 4: the same tokens, float32 values within the engine's noise
            assert_same_trajectory(Trajectory.from_json(mp["cases"][0]["trajectories"][p][choice]), here, "mp")


@pytest.mark.engine
def test_engine_greedy_completions_resume_from_recorded_states(engine, ckpt):
    """EGSPO's x̂₀ as engine requests that resume from a partly revealed block, against the core's."""
    from bd3_plugin.sampling.greedy_completion import greedy_completions

    _, results = engine
    states = [(Trajectory.from_json(t), b, p) for t, b, p, _ in results["greedy"]]
    core = greedy_completions(ckpt.model, states, eos_id=ckpt.eos_id)
    assert [g for *_, g in results["greedy"]] == core
    assert len(core) > 8 and any(len(g) < 10 for g in core) and any(len(g) == 10 for g in core)


def test_a_resume_block_outside_the_vocabulary_is_refused_in_the_front_end(monkeypatch):
    from vllm import SamplingParams
    from vllm_backend.registration import hf_config
    from vllm_backend.server.validate import BD3RequestValidator

    monkeypatch.setattr(hf_config, "ACTIVE_BLOCK_SIZE", None)
    monkeypatch.setattr(hf_config, "ACTIVE_VOCAB_SIZE", None)
    hf_config.BD3HFConfig(**json.loads((checkpoint_path(4) / "config.json").read_text()))  # as vLLM reads it
    hf_config.BD3HFConfig()  # transformers' default instance must not change what is served
    assert (hf_config.ACTIVE_BLOCK_SIZE, hf_config.ACTIVE_VOCAB_SIZE) == (4, 102)
    BD3RequestValidator.validate_params(SamplingParams(extra_args={"resume_block": [2, 2, 5, 101]}))
    for bad in ([2, 2, 5, 102], [2, 2, 5], [2, 2, 5, -1], [2, 2, 5, True]):
        with pytest.raises(ValueError, match="^resume_block must be a list of 4 token ids"):
            BD3RequestValidator.validate_params(SamplingParams(extra_args={"resume_block": bad}))


def test_logprobs_modes_vllm_cannot_be_honoured_are_refused_at_start():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_backend.registration.autoconfig import BD3ConfigError, apply

    for mode in ("raw_logits", "processed_logits", "bogus"):
        with pytest.raises(BD3ConfigError, match=rf"^--logprobs-mode {mode}: BD3 checkpoints return raw_logprobs"):
            apply(EngineArgs(model=str(checkpoint_path(4)), logprobs_mode=mode))
    args = EngineArgs(model=str(checkpoint_path(4)), logprobs_mode="processed_logprobs")
    apply(args)
    assert args.logprobs_mode == "processed_logprobs"


# ---- the server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(bd3_server):
    return bd3_server


def post(server, route, body):
    return requests.post(f"{server.base}/v1/{route}", json=body, headers=server.headers, timeout=120)


@pytest.mark.server
def test_served_trajectories_and_processed_logprobs(server, ckpt):
    """n = 2 on one prompt that ends inside a block: each choice carries the core's trajectory, and its
    logprobs are the sampled distribution's (processed_logprobs) at the reveal pass."""
    prompt = ckpt.encode(TEXTS[1])
    case = {"temperature": 0.8, "top_p": 0.9, "max_tokens": 14, "seed": 5, "extra_args": {"algorithm": "first_hitting"}}
    body = {"model": str(checkpoint_path(4)), "prompt": prompt, "max_tokens": 14, "temperature": 0.8, "top_p": 0.9,
            "seed": 5, "n": 2, "logprobs": 2, "vllm_xargs": {"algorithm": "first_hitting", "bd3_trajectory": True}}
    r = post(server, "completions", body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 2 and all("token_ids" not in c for c in choices)  # not asked for: not returned
    for i, choice in enumerate(choices):
        e = Trajectory.from_json(choice["bd3_trajectory"])
        assert_same_trajectory(e, core_trajectories(ckpt, [prompt], case, i)[0], f"served choice {i}")
        token_logprobs = choice["logprobs"]["token_logprobs"]
        generated = e.logprob[e.reveal_pass > 0][: len(token_logprobs)]
        assert_close(torch.tensor(token_logprobs, dtype=torch.float64), generated, 1e-5, "processed logprobs")
        for top, lp in zip(choice["logprobs"]["top_logprobs"], token_logprobs):
            assert max(top.values()) >= lp - 1e-6 and len(top) in (2, 3)
    chat = {"model": str(checkpoint_path(4)), "messages": [{"role": "user", "content": "<eos> the old cow"}],
            "max_tokens": 6, "temperature": 1.0, "seed": 2, "logprobs": True, "top_logprobs": 1,
            "vllm_xargs": {"bd3_trajectory": True}}
    r = post(server, "chat/completions", chat)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    e = Trajectory.from_json(c["bd3_trajectory"])
    chat_case = {"temperature": 1.0, "max_tokens": 6, "seed": 2, "extra_args": {"algorithm": "first_hitting"}}
    assert_same_trajectory(e, core_trajectories(ckpt, [list(e.prompt)], chat_case, 0)[0], "chat")
    lps = [t["logprob"] for t in c["logprobs"]["content"]]
    assert_close(torch.tensor(lps, dtype=torch.float64), e.logprob[e.reveal_pass > 0][: len(lps)], 1e-5, "chat")


@pytest.mark.server
def test_bad_trace_and_logprob_requests_are_one_line_400s(server):
    base_body = {"model": str(checkpoint_path(4)), "prompt": "<eos> the old cow", "max_tokens": 8, "temperature": 1.0}
    trace = {"vllm_xargs": {"bd3_trajectory": True}}
    for extra, param, needle in [
        (trace | {"stream": True}, "bd3_trajectory", "bd3_trajectory cannot be streamed"),
        (trace | {"prompt": ["<eos> a", "<eos> the"]}, "bd3_trajectory", "bd3_trajectory takes one prompt"),
        ({"logprobs": 50}, "logprobs", "greater than max allowed: 20"),
        ({"prompt_logprobs": 1}, "prompt_logprobs", "prompt_logprobs is not supported by the BD3 backend"),
        ({"echo": True, "logprobs": 1}, "prompt_logprobs", "prompt_logprobs is not supported by the BD3 backend"),
        ({"vllm_xargs": {"bd3_trajectory": "mine"}}, "bd3_trajectory", "bd3_trajectory must be true or false"),
        ({"vllm_xargs": {"resume_block": [1, 2]}}, None, "resume_block must be a list of 4 token ids"),
        ({"vllm_xargs": {"resume_block": [1, 2, 3, 999]}}, None, "resume_block must be a list of 4 token ids"),
    ]:
        r = post(server, "completions", base_body | extra)
        assert r.status_code == 400, (extra, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert needle in error["message"] and "\n" not in error["message"], (extra, error)
        assert param is None or error["param"] == param, (extra, error)
    assert requests.get(f"{server.base}/health").status_code == 200
