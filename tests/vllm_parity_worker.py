"""Job of tests/vllm_jobs.py for tests/test_vllm_backend.py: decode the given prompts through vLLM's engine
with each sampler, as a batch and the first prompt alone, and return the token ids."""
from vllm_jobs import engine


def run(spec: dict) -> list[dict]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    results = []
    with engine(spec["checkpoint"], dtype="float32", max_model_len=spec["max_model_len"], seed=0) as llm:
        for case in spec["cases"]:
            params = SamplingParams(temperature=case["temperature"], max_tokens=case["max_tokens"],
                                    seed=case["seed"], extra_args={"algorithm": case["algorithm"]},
                                    ignore_eos=True, top_k=case.get("top_k", 0))
            prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
            batch = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
            alone = [list(o.outputs[0].token_ids) for o in llm.generate(prompts[:1], params, use_tqdm=False)]
            results.append({"batch": batch, "alone": alone})
    return results
