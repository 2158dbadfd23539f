"""`bd3 serve CKPT`: start vLLM's OpenAI-compatible server for a BD3 checkpoint with the settings it needs.

Plain `vllm serve CKPT` also works (the plugin fills in the block-decoding engine arguments); this adds
CPU-friendly defaults and the middleware that turns bad streaming requests into 400s.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def command(checkpoint: str, host: str, port: int, max_model_len: int | None, extra: list[str]) -> list[str]:
    from bd3_plugin.checkpoint import read_config, resolve

    cfg = read_config(resolve(checkpoint))
    vllm = str(Path(sys.executable).with_name("vllm"))
    return [vllm, "serve", checkpoint, "--host", host, "--port", str(port), "--dtype", "float32",
            "--max-model-len", str(max_model_len or cfg.model_length),
            "--middleware", "vllm_backend.validate.check_request", *extra]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM sizes the CPU cache from NUMA memory otherwise
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def exec_server(checkpoint: str, host: str, port: int, max_model_len: int | None, extra: list[str]) -> None:
    argv = command(checkpoint, host, port, max_model_len, extra)
    print(" ".join(argv), file=sys.stderr)
    os.execve(argv[0], argv, environment())
