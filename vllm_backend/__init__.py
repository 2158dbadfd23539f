"""vLLM backend for BD3-LMs: the only package that imports vllm.

- `registration`: the general plugin (config classes, architectures) and the auto-configuration of plain
  `vllm serve` / `vllm.LLM` for a BD3 checkpoint;
- `worker`: what runs in the engine: the BD3 model on vLLM's paged cache, the runner that denoises blocks,
  block-causal metadata, the scheduler and proposer, trajectory recording, weight updates;
- `server`: the API front end: request fields and their validation, trajectories over HTTP, weight routes,
  `bd3 serve`;
- `rollout`: RL with an offline `vllm.LLM` (rollout engine, weight updates).
"""
