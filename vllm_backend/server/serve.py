"""`bd3 serve CKPT`: start vLLM's OpenAI-compatible server for a BD3 checkpoint with the settings it needs.

Plain `vllm serve CKPT` also works (the plugin fills in the block-decoding engine arguments); this adds
CPU-friendly defaults and the middleware that answers a request with an unsupported field or bad sampler
settings with a 400, streaming or not, and adds the /bd3 weight routes. The update route is there only when
`bd3 serve --weight-update-root DIR` names the folder it may read under; the server process learns it from
the environment (`BD3_WEIGHT_UPDATE_ROOT`), which `bd3 serve` sets from the flag alone.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


WEIGHT_ROOT_ENV = "BD3_WEIGHT_UPDATE_ROOT"

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


def engine_kwargs(argv: list[str]) -> dict:
    """A `vllm serve` command line (as `command` makes it) as keyword arguments, by vLLM's attribute names:
    every option that differs from vLLM's default, engine and front-end options alike (how Ray Serve's
    `LLMConfig.engine_kwargs` takes them), and the host and port. The model is the caller's. An argument
    vLLM refuses is a ValueError."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))

    def refuse(message: str):
        raise ValueError(f"vllm serve: {message}")

    parser.error = refuse  # a ValueError (one line for the CLI), not argparse's usage and exit
    args = vars(parser.parse_args(argv[2:]))
    return {name: value for name, value in args.items()
            if name in ("host", "port") or value != parser.get_default(name) and name not in ("model_tag", "model")}


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return ""


def environment(weight_update_root: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if "+cpu" in _vllm_version():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM sizes the CPU cache from NUMA memory otherwise
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop(WEIGHT_ROOT_ENV, None)  # the flag alone opens the update route, never an inherited variable
    if weight_update_root is not None:
        env[WEIGHT_ROOT_ENV] = str(weight_update_root)
    return env


def exec_server(checkpoint: str, host: str | None, port: int | None, max_model_len: int | None,
                extra: list[str], weight_update_root: Path | None = None) -> None:
    argv = command(checkpoint, host, port, max_model_len, extra)
    env = environment(weight_update_root)
    print(" ".join(argv), file=sys.stderr)
    warn_open_update(argv, env, weight_update_root)
    os.execve(argv[0], argv, env)


def warn_open_update(argv: list[str], env: dict, weight_update_root: Path | None) -> None:
    """Warn on stderr when the update route is on and nothing asks for an API key."""
    if weight_update_root is not None and "--api-key" not in flag_names(argv) and not env.get("VLLM_API_KEY"):
        print(f"warning: POST /bd3/update_weights (reading under {weight_update_root}) is open to anyone who "
              "can reach the server: give --api-key or VLLM_API_KEY", file=sys.stderr)
