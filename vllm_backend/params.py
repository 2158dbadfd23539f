"""Per-request BD3 sampler settings: `SamplingParams.extra_args` (the request's `vllm_xargs`) plus its
temperature and top_p, validated once, here, for the API front end and the runner alike."""
from __future__ import annotations

from bd3_plugin.generate import ALGORITHMS, SamplerConfig

KEYS = ("algorithm", "steps", "threshold", "block_size")


def sampler_config(params, block_size: int) -> SamplerConfig:
    """A SamplerConfig for one request, or ValueError naming the bad field."""
    extra = dict(params.extra_args or {})
    unknown = sorted(set(extra) - set(KEYS) - {"kv_transfer_params", "ec_transfer_params"})
    if unknown:
        raise ValueError(f"unknown vllm_xargs key(s) {', '.join(unknown)}; BD3 accepts {', '.join(KEYS)}")
    requested = extra.get("block_size")
    if requested is not None and requested != block_size:
        raise ValueError(f"block_size {requested} does not match the checkpoint's block size {block_size}")
    algorithm = extra.get("algorithm", "first_hitting")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    steps = extra.get("steps")
    threshold = extra.get("threshold", 0.9)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold!r}")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    temperature = 0.0 if params.temperature < 1e-5 else float(params.temperature)
    return SamplerConfig(algorithm=algorithm, max_new_tokens=max(params.max_tokens or 1, 1),
                         temperature=temperature, top_p=float(params.top_p), steps=steps,
                         threshold=float(threshold))
