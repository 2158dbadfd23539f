"""Job of tests/vllm_jobs.py for tests/test_vllm_traces.py: for each case, the trajectories of
`generate_with_trajectories`, and a plain `LLM.generate` of the same request with `logprobs` (token ids,
per-token logprob dicts); the refusal of `bd3_trajectory` without the middleware, and greedy completions
from recorded states."""
from vllm_jobs import engine


def _logprobs(choice):
    return [{str(t): [lp.logprob, lp.rank] for t, lp in step.items()} for step in choice.logprobs]


def _case(llm, prompts, case):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_backend.server.traces import generate_with_trajectories

    params = SamplingParams(**case)
    trajectories = generate_with_trajectories(llm, prompts, params)
    plain = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(**case, logprobs=3),
                         use_tqdm=False)
    return {"trajectories": [[t.to_json() for t in row] for row in trajectories],
            "token_ids": [[list(c.token_ids) for c in out.outputs] for out in plain],
            "logprobs": [[_logprobs(c) for c in out.outputs] for out in plain]}


def _refusal(llm, prompts):
    """`bd3_trajectory: true` straight into LLM.generate: nothing would fetch it, so it is refused."""
    from vllm import SamplingParams

    try:
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, extra_args={"bd3_trajectory": True}), use_tqdm=False)
    except Exception as err:  # vLLM raises its VLLMValidationError with the validator's message
        return str(err)
    return None


def _greedy(llm, case_result):
    """Greedy one-step completions from every third recorded step of the first case's rollouts."""
    from bd3_plugin.sampling.trajectory import Trajectory
    from vllm_backend.server.traces import greedy_completions

    states = []
    for row in case_result["trajectories"]:
        t = Trajectory.from_json(row[0])
        states += [(t, int(t.steps.block[k]), int(t.steps.pass_index[k])) for k in range(0, len(t.steps.block), 3)]
    states.append((states[0][0], int(states[0][0].block[-1]), int(states[0][0].reveal_pass.max()) + 1))
    got = greedy_completions(llm, states)
    return [[t.to_json(), b, p, g] for (t, b, p), g in zip(states, got)]


def run(spec: dict) -> dict:
    with engine(spec["checkpoint"], max_model_len=spec.get("max_model_len", 128), seed=0, enforce_eager=True,
                keep=spec.get("keep")) as llm:
        results = {"cases": [_case(llm, spec["prompts"], case) for case in spec["cases"]],
                   "refusal": _refusal(llm, [{"prompt_token_ids": p} for p in spec["prompts"]])}
        if spec.get("greedy"):
            results["greedy"] = _greedy(llm, results["cases"][0])
    return results
