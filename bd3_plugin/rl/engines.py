"""The core's rollout engine for the RL loop: G recorded rollouts per prompt, and new weights after each update.

`CoreEngine` runs `generate(record=True)` on its own copy of the model. The vLLM engine with the same methods
is `vllm_backend.rollout.VLLMEngine`. Both return, per prompt, its G `Trajectory`s, rollout i of prompt j
drawn with seed `seed + j·G + i`.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from bd3_plugin.sampling.config import SamplerConfig

from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.model import BD3LM
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.sampling.trajectory import Trajectory

class CoreEngine:
    """Rollouts by the core sampler on a copy of the policy (the copy is what `update` refreshes, so the
    rollout weights stay those of the last update while the trainer's model moves)."""

    def __init__(self, model: BD3LM, sampler: SamplerConfig, eos_id: int | None) -> None:
        self.model = copy.deepcopy(model).eval()
        self.sampler = sampler
        self.eos_id = eos_id
        self.version = "start"

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
