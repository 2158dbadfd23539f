"""Job of tests/vllm_jobs.py for tests/test_hub_ids.py: `vllm.LLM(model=<hub id>)` with the hub client pointed at
a fake hub (tests/fake_hub.py) and an empty cache; greedy tokens of the given prompts, and what the engine ran on."""
from pathlib import Path

from fake_hub import pointed_at
from vllm_jobs import engine


def run(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with pointed_at(spec["url"], Path(spec["home"])), engine(spec["model"], max_model_len=128, seed=0) as llm:
        params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
        config = llm.llm_engine.vllm_config
        return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "model": config.model_config.model,
                "worker": config.parallel_config.worker_cls}
