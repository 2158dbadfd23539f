"""Every sampler behind one interface, chosen by name from one registry.

`denoise_block` drives a sampler through `read` (before the pass: the slots whose logits the step will read)
and `step` (after it: a `StepResult`); the trajectory recorder and the RL scorer ask it the probability of
the positions a step revealed. A new sampler is one class with `@register_sampler("name")`: the loop, the
recorder, the scorer, the command line, lm-eval and vLLM take it by that name (`SamplerConfig.algorithm`),
and nothing outside this module compares sampler names.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from bd3_plugin.sampling.samplers import (StepResult, ddpm_selection_log_prob, ddpm_step, first_hitting_choice,
    first_hitting_step, threshold_miss_log_prob, threshold_step)

SAMPLERS: dict[str, type[Sampler]] = {}  # name -> class, in registration order


def register_sampler(name: str) -> Callable[[type[Sampler]], type[Sampler]]:
    """Class decorator: make the sampler available as `SamplerConfig(algorithm=name)`."""
    def add(cls: type[Sampler]) -> type[Sampler]:
        if name in SAMPLERS:
            raise ValueError(f"a sampler named {name!r} is already registered ({SAMPLERS[name].__qualname__})")
        cls.name = name
        SAMPLERS[name] = cls
        return cls

    return add


def unregister_sampler(name: str) -> None:
    if SAMPLERS.pop(name, None) is None:
        raise ValueError(f"no sampler named {name!r} is registered")


def sampler_names() -> tuple[str, ...]:
    """The registered names now, in registration order (the built-in samplers first)."""
    return tuple(SAMPLERS)


class _Names(Sequence):
    """A live, read-only view of the registered names: `ALGORITHMS`."""

    def __getitem__(self, i):
        return sampler_names()[i]

    def __len__(self) -> int:
        return len(SAMPLERS)

    def __repr__(self) -> str:
        return repr(sampler_names())


ALGORITHMS: Sequence[str] = _Names()


def sampler_class(name: str) -> type[Sampler]:
    if not isinstance(name, str) or name not in SAMPLERS:  # a request may send any JSON value
        raise ValueError(f"algorithm must be one of {', '.join(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def sampler_for(config, mask_id: int) -> Sampler:
    """The sampler a `SamplerConfig` names, for a model whose mask id is `mask_id`."""
    return sampler_class(config.algorithm)(config, mask_id)


class Sampler:
    """One sampling algorithm, set up from a `SamplerConfig` (temperature, top-p, top-k, steps, threshold).

    The probability of which positions a step revealed has three parts, so that the recorder (live
    distributions) and the scorer (replayed logits, with gradients) compute it alike: a θ-free term from
    the counts and levels (`selection_log_prob`), a θ-dependent term per slot the step left masked
    (`left_log_prob`, only where `selection_reads_left`), and whether the two describe the step at all
    (`selection_known`; a step with no closed form records NaN). The defaults fit a sampler whose choice
    of positions is a function of the state.
    """

    name: ClassVar[str]  # set by register_sampler
    keeps_logits: ClassVar[bool] = False  # a row whose block did not change may keep its logits (the
    # network ignores t, so only a step that may reveal nothing, DDPM's, ever leaves a row unchanged)
    uses_grid: ClassVar[bool] = False  # the step reads the levels t, s of SamplerConfig.steps grid points

    def __init__(self, config, mask_id: int) -> None:
        self.config = config
        self.mask_id = mask_id
        self.filters = dict(mask_id=mask_id, temperature=config.temperature, top_p=config.top_p,
                            top_k=config.top_k)

    @property
    def greedy(self) -> bool:
        """Temperature 0: every sampler here then draws nothing, so its choice is a function of the state."""
        return self.config.temperature == 0

    def read(self, masked: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Before the pass: the (B, L') slots whose logits the step will read (by default every masked one)."""
        return masked

    def step(self, logits: torch.Tensor, masked: torch.Tensor, read: torch.Tensor,
             generators: list[torch.Generator], grid: int, t: float, s: float, with_probs: bool = False
             ) -> StepResult:
        """After the pass: logits (B, L', V), valid at `read`; the masks (B, L'); the step's index in the
        block and its levels t > s on the grid."""
        raise NotImplementedError

    def selection_log_prob(self, n_masked: torch.Tensor, n_revealed: torch.Tensor, t: torch.Tensor,
                           s: torch.Tensor) -> torch.Tensor:
        """θ-free log-prob of which positions each step revealed, from its counts and levels (float64
        tensors, broadcast) -> float64."""
        return torch.zeros(torch.broadcast_shapes(n_masked.shape, n_revealed.shape), dtype=torch.float64,
                           device=n_masked.device)

    @property
    def selection_reads_left(self) -> bool:
        """Whether `left_log_prob` adds a term per slot a step left masked."""
        return False

    def left_log_prob(self, probs: torch.Tensor) -> torch.Tensor:
        """The sampler's distributions (n, V) at slots a step left masked -> each one's log-prob of that (n,)."""
        raise NotImplementedError(f"sampler {self.name!r} has no term for the slots a step leaves masked")

    def selection_known(self, reveal: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Per row (B,), whether the terms above give the probability of the step that revealed `reveal`
        (B, L'), q (B, L') being the sampler's probability of each revealed token (0 elsewhere)."""
        return torch.ones(reveal.shape[0], dtype=torch.bool, device=reveal.device)


@register_sampler("first_hitting")
class FirstHitting(Sampler):
    """One token per pass (Zheng et al.'s first-hitting time for α_t = 1 − t): at a uniformly drawn
    masked slot at temperature > 0, at the most confident one at temperature 0."""

    def read(self, masked, generators):
        return first_hitting_choice(masked, generators, self.config.temperature)

    def step(self, logits, masked, read, generators, grid, t, s, with_probs=False):
        return first_hitting_step(logits, read, generators, with_probs=with_probs, **self.filters)

    def selection_log_prob(self, n_masked, n_revealed, t, s):
        if self.greedy:
            return super().selection_log_prob(n_masked, n_revealed, t, s)
        return -n_masked.double().log()


@register_sampler("ddpm")
class DDPM(Sampler):
    """The posterior step from t to s: each masked slot is revealed with probability (t − s)/t."""

    keeps_logits = True
    uses_grid = True

    def step(self, logits, masked, read, generators, grid, t, s, with_probs=False):
        return ddpm_step(logits, masked, generators, t=t, s=s, with_probs=with_probs, **self.filters)

    def selection_log_prob(self, n_masked, n_revealed, t, s):
        if self.greedy:
            return super().selection_log_prob(n_masked, n_revealed, t, s)
        return ddpm_selection_log_prob(n_masked, n_revealed, t, s)


@register_sampler("threshold")
class Threshold(Sampler):
    """Confidence-threshold parallel decoding: reveal every proposal at least `threshold` probable, else
    the most confident one. When that fallback fires, the selection has no closed form."""

    def step(self, logits, masked, read, generators, grid, t, s, with_probs=False):
        return threshold_step(logits, masked, generators, threshold=self.config.threshold, with_probs=with_probs,
                              **self.filters)

    @property
    def selection_reads_left(self) -> bool:
        return not self.greedy

    def left_log_prob(self, probs):
        return threshold_miss_log_prob(probs, self.config.threshold)

    def selection_known(self, reveal, q):
        if self.greedy:
            return super().selection_known(reveal, q)
        return (reveal & (q >= self.config.threshold)).any(dim=1)
