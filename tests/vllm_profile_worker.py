"""Job of tests/vllm_jobs.py for tests/test_sampler_memory.py: vLLM's profiling pass (`profile_run`, which a
GPU worker runs to size the KV cache and the CPU build skips when eager) on the BD3 CPU runner of a built
engine, with the greedy tokens of a prompt before and after it."""
from vllm_jobs import engine, patched


def _profile(worker) -> dict:
    import torch

    import vllm_backend.worker.runner as runner_module

    runner = worker.model_runner
    steps = []
    original = runner_module.worst_block_step

    def recording(compute_logits, width, dtype, device, rows, block_size, mask_id):
        steps.append({"rows": rows, "block_size": block_size, "width": width})
        return original(compute_logits, width, dtype, device, rows, block_size, mask_id)

    with patched(runner_module, "worst_block_step", recording), torch.inference_mode():
        runner.profile_run()  # under inference mode, as vLLM's determine_available_memory runs it
    return {"runner": type(runner).__name__, "steps": steps, "hidden": runner.model_config.get_hidden_size()}


def run(spec: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with engine(spec["checkpoint"], dtype="float32", seed=0, **spec["engine"]) as llm:
        def greedy() -> list[int]:
            params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
            out = llm.generate([TokensPrompt(prompt_token_ids=spec["prompt"])], params, use_tqdm=False)
            return list(out[0].outputs[0].token_ids)

        before = greedy()
        profiled = llm.collective_rpc(_profile)[0]
        return {"before": before, "after": greedy(), **profiled}
