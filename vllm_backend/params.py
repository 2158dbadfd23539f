"""Per-request BD3 sampler settings: `SamplingParams.extra_args` (the request's `vllm_xargs`) plus its
temperature and top_p, validated once, here, for the API front end and the runner alike."""
from __future__ import annotations

from bd3_plugin.generate import SamplerConfig

KEYS = ("algorithm", "steps", "threshold", "block_size")


def sampler_config(params, block_size: int) -> SamplerConfig:
    """A SamplerConfig for one request, or ValueError naming the bad field."""
    extra = dict(params.extra_args or {})
    unknown = sorted(set(extra) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown vllm_xargs key(s) {', '.join(unknown)}; BD3 accepts {', '.join(KEYS)}")
    requested = extra.get("block_size")
    if requested is not None and requested != block_size:
        raise ValueError(f"block_size {requested} does not match the checkpoint's block size {block_size}")
    temperature = 0.0 if params.temperature < 1e-5 else float(params.temperature)
    # SamplerConfig checks the algorithm, steps and threshold (ValueError naming the field).
    return SamplerConfig(algorithm=extra.get("algorithm", "first_hitting"),
                         max_new_tokens=max(params.max_tokens or 1, 1), temperature=temperature,
                         top_p=float(params.top_p), steps=extra.get("steps"), threshold=extra.get("threshold", 0.9))
