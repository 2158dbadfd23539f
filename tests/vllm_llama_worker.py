"""Job of tests/vllm_jobs.py for tests/test_vllm_gpu_path.py: greedy tokens of a stock Llama checkpoint through
vLLM with the plugin installed (the process has the plugin's entry points, as every process of this
environment does); the same script's "without" side runs in a process that hides them."""
from vllm_jobs import engine

PROMPTS = [[1, 5, 9], [3, 1, 4, 1, 5, 9, 2, 6], [7]]


def run(spec: dict) -> dict:
    from vllm import ModelRegistry, SamplingParams
    from vllm.inputs import TokensPrompt

    with engine(spec["checkpoint"], skip_tokenizer_init=True, dtype="float32", max_model_len=64, seed=0,
                enforce_eager=True) as llm:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        return {"plugin": "BD3LM" in ModelRegistry.get_supported_archs(),
                "worker": llm.llm_engine.vllm_config.parallel_config.worker_cls,
                "tokens": [list(o.outputs[0].token_ids) for o in outs]}
