"""Per-request BD3 sampler settings: `SamplingParams.extra_args` (the request's `vllm_xargs`) plus its
temperature, top_p and top_k, validated once, here, for the API front end and the runner alike."""
from __future__ import annotations

from bd3_plugin.sampling.config import SamplerConfig

TRACE_KEY = "bd3_trajectory"  # record the request's trajectory, under this trace key (see traces.py)
TRACE_PREFIX = "bd3-trace-"
RESUME_KEY = "resume_block"  # start from a partly revealed block (see resume.py)
KEYS = ("algorithm", "steps", "threshold", "block_size", TRACE_KEY, RESUME_KEY)
TRACE_HOW = ("vllm_xargs bd3_trajectory: true needs the trace middleware of `bd3 serve` (--middleware "
             "vllm_backend.server.traces.attach_trajectories); from Python use "
             "vllm_backend.server.traces.generate_with_trajectories")


def check_trace_key(value) -> None:
    """Off (absent, false, 0) or a key made by `traces.py`; `true` reaching the engine means that no front
    end will fetch the trajectory, so it is refused rather than recorded and dropped."""
    if value in (None, False, 0):
        return
    if not (isinstance(value, str) and value.startswith(TRACE_PREFIX)):
        raise ValueError(TRACE_HOW)


def check_resume_block(value, block_size: int, vocab_size: int | None = None) -> None:
    """A resumed block's L' slots: token ids, the mask id at the slots still masked."""
    if value is None:
        return
    ok = isinstance(value, list) and len(value) == block_size and all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < (vocab_size or float("inf")) for t in value)
    if not ok:
        raise ValueError(f"resume_block must be a list of {block_size} token ids (the mask id at masked slots), "
                         f"got {value!r}")


def sampler_config(params, block_size: int) -> SamplerConfig:
    """A SamplerConfig for one request, or ValueError naming the bad field."""
    extra = dict(params.extra_args or {})
    unknown = sorted(set(extra) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown vllm_xargs key(s) {', '.join(unknown)}; BD3 accepts {', '.join(KEYS)}")
    requested = extra.get("block_size")
    if requested is not None and requested != block_size:
        raise ValueError(f"block_size {requested} does not match the checkpoint's block size {block_size}")
    check_trace_key(extra.get(TRACE_KEY))
    check_resume_block(extra.get(RESUME_KEY), block_size)
    temperature = 0.0 if params.temperature < 1e-5 else float(params.temperature)
    top_k = max(params.top_k or 0, 0)  # vLLM's off is 0 or -1 (and it resets top_k to 0 at temperature 0)
    # SamplerConfig checks the algorithm (any registered sampler), steps and threshold (ValueError naming the
    # field); a key the request leaves out keeps SamplerConfig's default.
    given = {k: extra[k] for k in ("algorithm", "steps", "threshold") if k in extra}
    return SamplerConfig(max_new_tokens=max(params.max_tokens or 1, 1), temperature=temperature,
                         top_p=float(params.top_p), top_k=top_k, **given)
