"""Rollout engines for the RL loop: G recorded rollouts per prompt, and new weights after each update.

`CoreEngine` runs `generate(record=True)` on its own copy of the model; `VLLMEngine` serves the rollouts
from a `vllm.LLM` over the checkpoint and loads each update in place (`vllm_backend.weights`). Both return,
per prompt, its G `Trajectory`s, rollout i of prompt j drawn with seed `seed + j·G + i`.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from .generate import SamplerConfig, generate
from .model import BD3LM
from .noise import seeded_generators
from .trajectory import Trajectory

ENGINES = ("core", "vllm")


class RolloutEngine(Protocol):
    def rollouts(self, prompts: Sequence[Sequence[int]], group: int, seed: int) -> list[list[Trajectory]]: ...

    def update(self, model: BD3LM, version: str) -> None: ...

    def close(self) -> None: ...


class CoreEngine:
    """Rollouts by the core sampler on a copy of the policy (the copy is what `update` refreshes, so the
    rollout weights stay those of the last update while the trainer's model moves)."""

    def __init__(self, model: BD3LM, sampler: SamplerConfig, eos_id: int | None) -> None:
        self.model = copy.deepcopy(model).eval()
        self.sampler, self.eos_id, self.version = sampler, eos_id, "start"

    def rollouts(self, prompts: Sequence[Sequence[int]], group: int, seed: int) -> list[list[Trajectory]]:
        rows = [list(p) for p in prompts for _ in range(group)]
        gens = seeded_generators([seed + i for i in range(len(rows))])
        out = generate(self.model, rows, self.sampler, gens, eos_id=self.eos_id, record=True)
        return [out.trajectories[j * group : (j + 1) * group] for j in range(len(prompts))]

    def update(self, model: BD3LM, version: str) -> None:
        with torch.no_grad():
            self.model.load_state_dict(model.state_dict(), strict=True)
        self.version = version

    def close(self) -> None:
        pass


class VLLMEngine:
    """Rollouts from an in-process `vllm.LLM` over the checkpoint; `update` loads the trainer's state dict
    into the running engine (strictly checked) under a version label."""

    def __init__(self, checkpoint: str | Path, sampler: SamplerConfig, model_length: int, seed: int) -> None:
        # In-process engine: the weight update runs as a callable on the worker, no worker extension needed.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM
        except ImportError as err:
            raise ValueError(f"--engine vllm needs vLLM ({err}); install bd3-plugin[cpu] or [gpu]") from None
        self.llm = LLM(str(checkpoint), max_model_len=model_length, seed=seed, dtype="float32")
        self.sampler, self.version = sampler, "start"

    def _params(self, group: int, seed: int):
        from vllm import SamplingParams

        s = self.sampler
        return SamplingParams(n=group, seed=seed, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              max_tokens=s.max_new_tokens, extra_args={"algorithm": s.algorithm})

    def rollouts(self, prompts: Sequence[Sequence[int]], group: int, seed: int) -> list[list[Trajectory]]:
        from vllm_backend.traces import generate_with_trajectories

        # vLLM seeds the n children of a request seed, seed + 1, …: one request per prompt keeps every
        # rollout's seed distinct even when prompts repeat.
        out = []
        for j, p in enumerate(prompts):
            out += generate_with_trajectories(self.llm, [list(p)], self._params(group, seed + j * group))
        return out

    def update(self, model: BD3LM, version: str) -> None:
        from vllm_backend.weights import update_weights

        update_weights(self.llm, {k: v.detach().cpu() for k, v in model.state_dict().items()}, version)
        self.version = version

    def close(self) -> None:
        del self.llm
