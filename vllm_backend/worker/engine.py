"""The engine-side classes that make vLLM's V1 engine decode block by block.

- `MaskProposer` (speculative `custom_class`): after each step, every request gets the MASK placeholders
  that fill its current block up to the next multiple of L' (so blocks sit at absolute multiples of L').
- `BD3Scheduler`: diffusion accounting (no token is sampled after prefill); a request whose computed
  tokens end inside a block (a prompt's tail) recomputes from the block's start, so the tail sits clean in
  the first noisy block, as in the core sampler; a request whose last block was decoded in a block step
  recomputes that block in its next step, in front of the next block's masks, so the clean K/V of block b
  is written by the first pass over block b+1 (no separate commit pass; a request that ends needs none);
  and every chunk it schedules ends on a block boundary (or at the end of what the request has), so no
  block is ever split across steps.
- `engine_kwargs`: the engine arguments, naming the worker of the platform (`cpu_worker.BD3CPUWorker` or
  `gpu_worker.BD3GPUWorker`) by string: vLLM imports it in the worker process only.

This module is on the plugin's registration path: it must not import a vLLM worker or runner module.
"""
from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

PKG = "vllm_backend.worker"  # where vLLM imports the worker, scheduler and proposer from, by name
WORKERS = {"cpu": f"{PKG}.cpu_worker.BD3CPUWorker", "cuda": f"{PKG}.gpu_worker.BD3GPUWorker"}


def _bd3(vllm_config):
    return vllm_config.model_config.hf_config.to_bd3()


class MaskProposer:
    def __init__(self, vllm_config) -> None:
        cfg = _bd3(vllm_config)
        self.block_size = cfg.block_size
        self.mask_id = cfg.mask_id

    def load_model(self, *args, **kwargs) -> None:  # the CPU runner calls it on every drafter
        pass

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        return [[self.mask_id] * (self.block_size - int(num_tokens_no_spec[i]) % self.block_size)
                for i in range(len(sampled_token_ids))]


def whole_blocks(num_computed: int, num_new: int, target: int, block_size: int) -> int:
    """How many of `num_new` scheduled tokens to keep so that the chunk ends on a multiple of
    `block_size`, or exactly at `target` (everything the request has: its prompt end, or the end of its
    block of masks). 0 when not even one whole block fits."""
    end = num_computed + num_new
    if end == target:
        return num_new
    return max(end - end % block_size - num_computed, 0)


class BD3Scheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_sampled_tokens_per_step = 0  # a block step returns the block; prefill returns nothing
        self.block_size = _bd3(self.vllm_config).block_size
        # Requests whose last block holds the noisy K/V of its block step's last denoising pass. Nothing
        # reads it before the request's next step recomputes it: the cache is the request's own (prefix
        # caching is off), and a preempted request recomputes everything.
        self.noisy: set[str] = set()

    def schedule(self, *args, **kwargs):
        for request in self.running:
            computed = request.num_computed_tokens
            if computed != request.num_tokens or not request.spec_token_ids:
                continue  # mid-prefill, or already rewound
            if computed % self.block_size:
                request.num_computed_tokens -= computed % self.block_size  # recompute the tail inside its block
            elif request.request_id in self.noisy:
                request.num_computed_tokens -= self.block_size  # recompute the decoded block, clean
        out = super().schedule(*args, **kwargs)
        # A request scheduled without masks (the token budget cut them) has its clean block recomputed.
        self.noisy -= set(out.num_scheduled_tokens) | out.finished_req_ids | (out.preempted_req_ids or set())
        self.noisy |= set(out.scheduled_spec_decode_tokens)
        return out

    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        # vLLM's last say on every chunk size, for running and waiting (new or resumed) requests alike;
        # its own cuts (token budget, long-prefill threshold) may end a chunk inside a block or schedule
        # part of a block's masks: round those down to whole blocks.
        num_new = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        return whole_blocks(num_computed_tokens, num_new, request.num_tokens_with_spec, self.block_size)


def engine_kwargs(block_size: int, device: str = "cpu") -> dict:
    """The engine arguments that turn on block decoding (for `vllm.LLM(...)` or `vllm serve`) on a
    platform ("cpu" or "cuda")."""
    return {
        "speculative_config": {"method": "custom_class", "model": f"{PKG}.engine.MaskProposer",
                               "num_speculative_tokens": block_size},
        "scheduler_cls": f"{PKG}.engine.BD3Scheduler",
        "worker_cls": WORKERS[device],
        "enable_prefix_caching": False,
        "enforce_eager": True,
    }


__all__ = ["BD3Scheduler", "MaskProposer", "engine_kwargs", "whole_blocks"]
