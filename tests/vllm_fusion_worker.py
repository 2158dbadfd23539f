"""Job of tests/vllm_jobs.py for tests/test_vllm_fusion.py: decode through vLLM's engine (in this process)
while recording every logits call the runner answers for `denoise_block` (block positions, block, logits,
read mask) and every block step's shape, and save them with the tokens and pass counts (torch.save).
With "read_check", every call is asked again with the same blocks and `read` = the masked slots (an extra
pass over the group's blocks alone, which rewrites the same K/V).

With "fuse": false, the scheduler forgets which requests hold a noisy last block, so nothing recomputes
that block's K/V clean: the negative control of the K/V test."""
from contextlib import ExitStack

from vllm_jobs import engine, patched


def run(spec: dict) -> None:
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_backend.worker.engine import BD3Scheduler
    from vllm_backend.worker.runner import BD3RunnerMixin

    calls, steps = [], []
    group_forward, block_rows, schedule = BD3RunnerMixin._group_forward, BD3RunnerMixin._block_rows, BD3Scheduler.schedule

    def recording_group_forward(self, first, entered, starts, positions, run):
        forward = group_forward(self, first, entered, starts, positions, run)
        where = positions[torch.tensor(starts)].tolist()  # absolute position of each block's first slot

        def recorded(block, read=None):
            logits = forward(block, read)
            call = {"positions": where, "block": block.clone(), "logits": logits.clone(),
                    "read": None if read is None else read.clone()}
            if spec.get("read_check"):  # the same blocks again, asking for the masked slots only
                call["masked"] = block == self.bd3.mask_id
                call["again"] = forward(block, call["masked"]).clone()
            calls.append(call)
            return logits

        return recorded

    def recording_block_rows(self, step):
        rows = block_rows(self, step)
        steps.append({"tokens": step.total_num_scheduled_tokens, "blocks": len(rows),
                      "block_tokens": sum(step.num_scheduled_tokens[r[0]] for r in rows),
                      "groups": len({self._config(r[0]) for r in rows})})
        return rows

    def forgetting_schedule(self, *args, **kwargs):
        self.noisy.clear()
        return schedule(self, *args, **kwargs)

    with ExitStack() as stack:
        stack.enter_context(patched(BD3RunnerMixin, "_group_forward", recording_group_forward))
        stack.enter_context(patched(BD3RunnerMixin, "_block_rows", recording_block_rows))
        if not spec.get("fuse", True):
            stack.enter_context(patched(BD3Scheduler, "schedule", forgetting_schedule))
        llm = stack.enter_context(engine(spec["checkpoint"], dtype="float32", max_model_len=128, seed=0,
                                         **spec.get("engine", {})))
        runs = []
        for run in spec["runs"]:  # each run: one generate call over its requests
            params = [SamplingParams(temperature=r["temperature"], max_tokens=r["max_tokens"], seed=r["seed"],
                                     extra_args={"algorithm": r["algorithm"]}, ignore_eos=True) for r in run]
            before, first_call, first_step = llm.collective_rpc("bd3_forward_passes")[0], len(calls), len(steps)
            outs = llm.generate([TokensPrompt(prompt_token_ids=r["prompt"]) for r in run], params, use_tqdm=False)
            runs.append({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                         "passes": llm.collective_rpc("bd3_forward_passes")[0] - before,
                         "calls": calls[first_call:], "steps": steps[first_step:]})
    torch.save(runs, spec["out"])
