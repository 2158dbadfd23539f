"""Job of tests/vllm_jobs.py for tests/test_vllm_load.py: decode all prompts at once through vLLM's engine (in
this process: its scheduler is ours) under a small token budget and a small KV cache, and return the token
ids, how many times the scheduler preempted a request, and how the chunks it scheduled ended."""
from vllm_jobs import engine, patched


def run(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_backend.worker.engine import BD3Scheduler

    preempted = []
    original = BD3Scheduler._preempt_request

    def counting(self, request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(self, request, *args, **kwargs)

    chunks = {"split": 0, "cut": 0}  # chunks that end inside a block; chunks shorter than what the request had
    schedule = BD3Scheduler.schedule

    def checking(self, *args, **kwargs):
        wanted = {r.request_id: r.num_tokens_with_spec - r.num_computed_tokens for r in self.running}
        out = schedule(self, *args, **kwargs)
        for rid, n in out.num_scheduled_tokens.items():
            request = self.requests[rid]  # its num_computed_tokens now counts this step's tokens
            end = request.num_computed_tokens
            whole = request.num_tokens + len(out.scheduled_spec_decode_tokens.get(rid, ()))
            chunks["split"] += bool(end % self.block_size and end != whole)
            chunks["cut"] += end < (whole if rid not in wanted else end - n + wanted[rid])
        return out

    with patched(BD3Scheduler, "_preempt_request", counting), patched(BD3Scheduler, "schedule", checking), \
            engine(spec["checkpoint"], dtype="float32", seed=0, **spec["engine"]) as llm:
        results = []
        for case in spec["cases"]:
            params = [SamplingParams(temperature=case["temperature"], max_tokens=spec["max_tokens"], seed=seed,
                                     extra_args={"algorithm": case["algorithm"]}, ignore_eos=True)
                      for seed in spec["seeds"]]
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
            results.append([list(o.outputs[0].token_ids) for o in outs])
        cache = llm.llm_engine.vllm_config.cache_config
        return {"tokens": results, "preemptions": len(preempted), **chunks, "kv_blocks": cache.num_gpu_blocks,
                "kv_block_size": cache.block_size}
