"""RL rollouts from a pool of vLLM engines on Ray: `RolloutPool` has the methods of the core's
`bd3_plugin.rl.engines.CoreEngine` (`rollouts`, `update`, `close`, `version`), with N engines as Ray actors.

A rollout batch is split by prompt into N contiguous parts, one per engine, and prompt j keeps the seeds it
has in one engine (seed + j·G + i for its rollout i), so the pool draws the rollouts one engine would. An
update puts the trainer's state dict into the object store once and every engine loads it (strictly, under
the version label) before the next rollouts; a failed load on any engine fails the update."""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from ray_jobs.plan import shard_range


class PoolError(RuntimeError):
    """A pool that cannot start (the message is for the user)."""


def _split(count: int, parts: int) -> list[range]:
    """`count` prompts in `parts` contiguous ranges, as a sweep shards documents (empty ones dropped)."""
    return [r for r in (shard_range(count, k, parts) for k in range(parts)) if r]


class _Engine:
    """One pool member: `vllm_backend.rollout.VLLMEngine` in a Ray actor (the engine in the actor's process)."""

    def __init__(self, checkpoint: str, sampler, model_length: int, seed: int) -> None:
        from vllm_backend.rollout import VLLMEngine

        self.engine = VLLMEngine(checkpoint, sampler, model_length, seed)

    def rollouts(self, prompts, group: int, seed: int):
        return self.engine.rollouts(prompts, group, seed)

    def load(self, state, version: str) -> float:
        start = time.perf_counter()
        self.engine.load(state, version)
        return time.perf_counter() - start

    def where(self) -> str:
        import os

        return f"{os.uname().nodename}:{os.getpid()}"


class RolloutPool:
    """N vLLM engines as Ray actors, each loading `checkpoint`; `address` None starts a new local Ray instance."""

    def __init__(self, checkpoint: str | Path, sampler, model_length: int, seed: int, workers: int,
                 address: str | None = None) -> None:
        from ray_jobs.cluster import ClusterError, connect, one_device_each

        if workers < 1:
            raise PoolError(f"--rollout-workers must be >= 1, got {workers}")
        try:
            self.ray = connect(address, None)
        except ClusterError as err:
            raise PoolError(str(err)) from None
        try:
            resources = one_device_each(self.ray, workers, "--rollout-workers", "engine")
        except ClusterError as err:
            self.ray.shutdown()
            raise PoolError(str(err)) from None
        actor = self.ray.remote(**resources)(_Engine)
        self.engines = [actor.remote(str(checkpoint), sampler, model_length, seed) for _ in range(workers)]
        self.places = self.ray.get([e.where.remote() for e in self.engines])  # waits until every engine is up
        self.version = "start"
        self.broadcast_seconds: list[float] = []

    def rollouts(self, prompts: Sequence[Sequence[int]], group: int, seed: int) -> list:
        parts = _split(len(prompts), len(self.engines))
        refs = [engine.rollouts.remote([list(p) for p in prompts[part.start : part.stop]], group,
                                       seed + part.start * group)
                for engine, part in zip(self.engines, parts)]
        return [groups for part in self.ray.get(refs) for groups in part]

    def update(self, model, version: str) -> None:
        state = self.ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
        loads = self.ray.get([engine.load.remote(state, version) for engine in self.engines])
        self.broadcast_seconds.append(max(loads))
        self.version = version

    def close(self) -> None:
        for engine in self.engines:
            self.ray.kill(engine)
        self.engines = []
        self.ray.shutdown()
