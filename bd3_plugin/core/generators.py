"""Random generators passed to every stochastic function: one per row, so results do not depend on the batch."""
from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator]


def per_row(generators: Generators, rows: int) -> list[torch.Generator]:
    """One generator per row. A single generator is shared (results then depend on the batch)."""
    if isinstance(generators, torch.Generator):
        return [generators] * rows
    if len(generators) != rows:
        raise ValueError(f"got {len(generators)} generators for {rows} rows")
    return list(generators)


def seeded_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per seed on `device`. A seed's stream depends on the device's generator (CPU: Mersenne
    Twister; CUDA: Philox), so the same seed draws other numbers, and samples other tokens, on CUDA."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]
