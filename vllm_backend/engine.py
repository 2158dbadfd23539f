"""The engine-side classes that make vLLM's V1 engine decode block by block.

- `MaskProposer` (speculative `custom_class`): after each step, every request gets the MASK placeholders
  that fill its current block up to the next multiple of L' (so blocks sit at absolute multiples of L').
- `BD3Scheduler`: diffusion accounting (no token is sampled after prefill), and a request whose computed
  tokens end inside a block (a prompt's tail) recomputes from the block's start: the tail sits clean in
  the first noisy block, as in the core sampler.
- `BD3Worker`: the CPU worker with `BD3ModelRunner` installed.
"""
from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.worker import cpu_worker

PKG = "vllm_backend.engine"


def _bd3(vllm_config):
    return vllm_config.model_config.hf_config.to_bd3()


class MaskProposer:
    def __init__(self, vllm_config) -> None:
        cfg = _bd3(vllm_config)
        self.block_size, self.mask_id = cfg.block_size, cfg.mask_id

    def load_model(self, *args, **kwargs) -> None:  # the CPU runner calls it on every drafter
        pass

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        return [[self.mask_id] * (self.block_size - int(num_tokens_no_spec[i]) % self.block_size)
                for i in range(len(sampled_token_ids))]


class BD3Scheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_sampled_tokens_per_step = 0  # a block step returns the block; prefill returns nothing
        self.block_size = _bd3(self.vllm_config).block_size

    def schedule(self, *args, **kwargs):
        for request in self.running:
            tail = request.num_computed_tokens % self.block_size
            if tail and request.num_computed_tokens == request.num_tokens and request.spec_token_ids:
                request.num_computed_tokens -= tail  # recompute the tail inside its block
        return super().schedule(*args, **kwargs)


class BD3Worker(cpu_worker.CPUWorker):
    def init_device(self) -> None:
        from .runner import BD3ModelRunner

        original = cpu_worker.CPUModelRunner
        cpu_worker.CPUModelRunner = BD3ModelRunner
        try:
            super().init_device()
        finally:
            cpu_worker.CPUModelRunner = original

    def bd3_forward_passes(self) -> int:
        """Model passes so far (for `LLM.collective_rpc("bd3_forward_passes")`)."""
        return self.model_runner.forward_passes


def engine_kwargs(block_size: int) -> dict:
    """The engine arguments that turn on block decoding (for `vllm.LLM(...)` or `vllm serve`)."""
    return {
        "speculative_config": {"method": "custom_class", "model": f"{PKG}.MaskProposer",
                               "num_speculative_tokens": block_size},
        "scheduler_cls": f"{PKG}.BD3Scheduler",
        "worker_cls": f"{PKG}.BD3Worker",
        "enable_prefix_caching": False,
        "enforce_eager": True,
    }


__all__ = ["BD3Scheduler", "BD3Worker", "MaskProposer", "engine_kwargs"]
