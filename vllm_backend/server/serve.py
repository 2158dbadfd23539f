"""`bd3 serve CKPT`: start vLLM's OpenAI-compatible server for a BD3 checkpoint with the settings it needs.

Plain `vllm serve CKPT` also works (the plugin fills in the block-decoding engine arguments); this adds
CPU-friendly defaults and the middleware that answers a request with an unsupported field or bad sampler
settings with a 400, streaming or not.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


# Request validation (400s, streaming or not), the weight-update routes (/bd3/update_weights,
# /bd3/weight_info) and trajectories in responses. The last is outermost (vLLM adds them in order): the
# trace middleware sets its trace key before validation sees the request.
MIDDLEWARE = ("vllm_backend.server.validate.check_request", "vllm_backend.server.weight_routes.weight_routes",
              "vllm_backend.server.traces.attach_trajectories")


def flag_names(args: list[str]) -> set[str]:
    """The long options in a `vllm serve` argument list, as vLLM reads them (`--max_model_len=8` is
    `--max-model-len`)."""
    return {a.split("=", 1)[0].replace("_", "-") for a in args if a.startswith("--")}


def command(checkpoint: str, host: str | None, port: int | None, max_model_len: int | None,
            extra: list[str]) -> list[str]:
    """The `vllm serve` command line: bd3's defaults for the flags the user did not give, then the user's
    further arguments, each exactly once. A flag given both to bd3 and among the further arguments is an
    error (ValueError) rather than a silent choice between the two."""
    from bd3_plugin.core.checkpoint import read_config, checkpoint_folder

    given = flag_names(extra)
    for flag, value in (("--host", host), ("--port", port), ("--max-model-len", max_model_len)):
        if value is not None and flag in given:
            raise ValueError(f"{flag} is given twice (to bd3 serve and among the vLLM arguments)")
    defaults = {"--host": host or "127.0.0.1", "--port": 8000 if port is None else port, "--dtype": "float32"}
    if "--max-model-len" not in given:
        defaults["--max-model-len"] = max_model_len or read_config(checkpoint_folder(checkpoint)).model_length
    vllm = str(Path(sys.executable).with_name("vllm"))
    argv = [vllm, "serve", checkpoint]
    for flag, value in defaults.items():
        if flag not in given:
            argv += [flag, str(value)]
    for middleware in MIDDLEWARE:
        if middleware not in extra:
            argv += ["--middleware", middleware]
    return argv + list(extra)


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return ""


def environment() -> dict[str, str]:
    env = dict(os.environ)
    if "+cpu" in _vllm_version():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM sizes the CPU cache from NUMA memory otherwise
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def exec_server(checkpoint: str, host: str | None, port: int | None, max_model_len: int | None,
                extra: list[str]) -> None:
    argv = command(checkpoint, host, port, max_model_len, extra)
    print(" ".join(argv), file=sys.stderr)
    os.execve(argv[0], argv, environment())
