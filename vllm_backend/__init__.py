"""vLLM backend for BD3-LMs: the only place vllm is imported."""
