"""Plain `vllm serve <bd3 checkpoint>` and `vllm.LLM(<bd3 checkpoint>)`: when the model's config.json says
bd3lm/mdlm, the engine arguments that block decoding needs are filled in before vLLM builds its config.
An argument the user set to something incompatible is an error that names it."""
from __future__ import annotations

import json
from pathlib import Path

from .engine import engine_kwargs

_PATCHED = "_bd3_autoconfig"


def bd3_block_size(model: str) -> int | None:
    """The block size of a local or cached BD3/MDLM checkpoint; None for anything else."""
    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
            path = Path(cached) if isinstance(cached, str) else path
        except Exception:
            return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if raw.get("model_type") == "bd3lm":
        return int(raw.get("block_size", 4))
    if raw.get("model_type") == "mdlm":
        return int(raw.get("block_size", raw.get("model_length", 1024)))
    return None


def apply(args) -> None:
    """Fill in the block-decoding engine arguments on an EngineArgs for a BD3 checkpoint."""
    size = bd3_block_size(str(args.model))
    if size is None:
        return
    wanted = engine_kwargs(size)
    spec = args.speculative_config
    if spec is not None and spec != wanted["speculative_config"]:
        raise ValueError(f"a BD3 checkpoint decodes blocks through its own speculative_config; got {spec}")
    args.speculative_config = wanted["speculative_config"]
    if args.scheduler_cls not in (None, wanted["scheduler_cls"]):
        raise ValueError(f"a BD3 checkpoint needs scheduler_cls={wanted['scheduler_cls']}, got {args.scheduler_cls}")
    args.scheduler_cls = wanted["scheduler_cls"]
    if args.worker_cls not in ("auto", wanted["worker_cls"]):
        raise ValueError(f"a BD3 checkpoint needs worker_cls={wanted['worker_cls']}, got {args.worker_cls}")
    args.worker_cls = wanted["worker_cls"]
    if args.enable_prefix_caching:
        raise ValueError("prefix caching is not supported for BD3 checkpoints (--no-enable-prefix-caching)")
    args.enable_prefix_caching = False
    args.enforce_eager = True
    if args.dtype == "auto":
        args.dtype = "float32"  # the checkpoints' dtype, and the core's: tokens match it exactly


def install() -> None:
    """Wrap EngineArgs.create_engine_config once per process."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, _PATCHED, False):
        return
    original = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        apply(self)
        return original(self, *args, **kwargs)

    setattr(create_engine_config, _PATCHED, True)
    EngineArgs.create_engine_config = create_engine_config
