"""Generation: the samplers (first-hitting, DDPM, confidence threshold) and their registry, the block
loop `denoise_block` shared by the core and the vLLM runner, batching over one KV cache, `generate`,
greedy one-step completions, and rollout trajectories with their recorder.
"""
from bd3_plugin._exports import lazy_exports

_EXPORTS = {
    "SamplerConfig": "config",
    "ALGORITHMS": "config",
    "generate": "generate",
    "Generation": "generate",
    "GenerateOutput": "generate",
    "denoise_block": "denoise",
    "greedy_completions": "greedy_completion",
    "completion_start": "greedy_completion",
    "Trajectory": "trajectory",
    "BlockRecorder": "trajectory",
    "token_probs": "samplers",
    "Sampler": "registry",
    "StepResult": "samplers",
    "register_sampler": "registry",
    "sampler_for": "registry",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
