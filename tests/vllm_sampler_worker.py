"""Job of tests/vllm_jobs.py for tests/test_sampler_registry.py: the test file's toy sampler, registered in this
process for the job's duration, decoded by a vLLM engine in this process (which sees this registry)."""
from vllm_jobs import engine


def run(spec: dict) -> list:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from bd3_plugin.sampling.registry import register_sampler, unregister_sampler
    from test_sampler_registry import NAME, Leftmost

    register_sampler(NAME)(Leftmost)
    try:
        with engine(spec["checkpoint"], dtype="float32", max_model_len=128, seed=0, enforce_eager=True) as llm:
            results = []
            for case in spec["cases"]:
                params = [SamplingParams(temperature=case["temperature"], max_tokens=case["max_tokens"],
                                         seed=case["seed"] + i, extra_args={"algorithm": NAME}, ignore_eos=True)
                          for i in range(len(spec["prompts"]))]
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params,
                                    use_tqdm=False)
                results.append([list(o.outputs[0].token_ids) for o in outs])
    finally:
        unregister_sampler(NAME)
    return results
