"""RL with an offline `vllm.LLM`: new weights in the running engine (`update_weights`, `weight_version`), and
`VLLMEngine`, which has the methods of the core's `bd3_plugin.rl.engines.CoreEngine` (G recorded rollouts
per prompt, strict weight updates under a version label) over an in-process `vllm.LLM`."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from bd3_plugin.core.model import BD3LM
from bd3_plugin.sampling.config import SamplerConfig
from bd3_plugin.sampling.trajectory import Trajectory
from vllm_backend.worker.weights import (NO_EXTENSION, Source, WeightUpdateError, check_version, missing_extension,
                                     apply_weights, bd3_config, check_source)


def _same_process(llm) -> bool:
    """Whether the engine's worker runs in this process (an in-process engine with one worker)."""
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    return isinstance(getattr(llm.llm_engine, "model_executor", None), UniProcExecutor)



def update_weights(llm, source: Source, version: str) -> None:
    """Load `source` into every worker of a `vllm.LLM`, then label the engine's weights `version`.
    On any error the engine keeps its weights and its label."""
    version = check_version(version)
    check_source(source, bd3_config(llm.llm_engine.vllm_config))
    same_process = _same_process(llm)
    if not isinstance(source, Mapping):
        source = str(Path(source).expanduser().resolve())
    elif not same_process:
        # Another process: vLLM pickles the arguments, and tensors it has already sent over its own
        # message queue no longer pickle, so the state dict travels as one safetensors buffer.
        from safetensors.torch import save

        source = save({k: v.detach().cpu().contiguous() for k, v in source.items()})
    # In this process the function itself runs on the worker; elsewhere the worker needs the method.
    try:
        llm.collective_rpc(apply_weights if same_process else "bd3_update_weights", args=(source,))
    except Exception as err:
        if missing_extension(err):
            raise WeightUpdateError(NO_EXTENSION) from None
        raise
    llm.update_weight_version(version)


def weight_version(llm) -> str:
    """The label of the weights a `vllm.LLM` serves ("default" before any update)."""
    return llm.get_weight_version()


class VLLMEngine:
    """Rollouts from an in-process `vllm.LLM` over the checkpoint; `update` loads the trainer's state dict
    into the running engine (strictly checked) under a version label."""

    def __init__(self, checkpoint: str | Path, sampler: SamplerConfig, model_length: int, seed: int) -> None:
        # In-process engine: the weight update runs as a callable on the worker, no worker extension needed.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.llm = LLM(str(checkpoint), max_model_len=model_length, seed=seed, dtype="float32")
        self.sampler = sampler
        self.version = "start"

    def _params(self, group: int, seed: int):
        from vllm import SamplingParams

        s = self.sampler
        return SamplingParams(n=group, seed=seed, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              max_tokens=s.max_new_tokens, extra_args={"algorithm": s.algorithm})

    def rollouts(self, prompts: Sequence[Sequence[int]], group: int, seed: int) -> list[list[Trajectory]]:
        from vllm_backend.server.traces import generate_with_trajectories

        # vLLM seeds the n children of a request seed, seed + 1, …: one request per prompt keeps every
        # rollout's seed distinct even when prompts repeat.
        out = []
        for j, p in enumerate(prompts):
            out += generate_with_trajectories(self.llm, [list(p)], self._params(group, seed + j * group))
        return out

    def update(self, model: BD3LM, version: str) -> None:
        self.load({k: v.detach().cpu() for k, v in model.state_dict().items()}, version)

    def load(self, state: Mapping, version: str) -> None:
        """`update` from a state dict (what a pool of engines on Ray receives through the object store)."""
        update_weights(self.llm, state, version)
        self.version = version

    def close(self) -> None:
        del self.llm
