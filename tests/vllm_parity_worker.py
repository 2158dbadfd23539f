"""Run by tests/test_vllm_backend.py in a subprocess (one engine per process): decode the given prompts
through vLLM's engine with each sampler and print the token ids as JSON."""
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    checkpoint, spec = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(checkpoint, dtype="float32", max_model_len=spec["max_model_len"], seed=0)
    results = []
    for case in spec["cases"]:
        params = SamplingParams(temperature=case["temperature"], max_tokens=case["max_tokens"], seed=case["seed"],
                                extra_args={"algorithm": case["algorithm"]}, ignore_eos=True,
                                top_k=case.get("top_k", 0))
        prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
        batch = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        alone = [list(o.outputs[0].token_ids) for o in llm.generate(prompts[:1], params, use_tqdm=False)]
        results.append({"batch": batch, "alone": alone})
    print("RESULTS " + json.dumps(results))
