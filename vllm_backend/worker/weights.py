"""New weights in a running BD3 engine, without a restart, with the same strict checks as loading.

A source is a checkpoint folder (its config.json must describe the running model), a `.safetensors` file,
or an in-memory state dict `{name: tensor}` in the checkpoint's `backbone.*` names. Names and shapes are
checked before anything is copied, where the call is made (from the safetensors header) and again in each
worker by `BD3ForVLLM.load_weights`: a bad source raises one error naming every missing, unexpected and
mis-shaped tensor, and the engine keeps its weights. The version label is vLLM's engine weight version.

Here: the strict checks and the worker side. Both BD3 workers have `BD3WeightSync` (`bd3_update_weights`)
as a base; another worker class can take it as `worker_extension_cls=EXTENSION`. An in-process engine
needs none of it (the same function goes to `collective_rpc` as a callable). The offline API
(`update_weights(llm, …)`) is in `vllm_backend.rollout`; the HTTP routes and their client in
`vllm_backend.server.weight_routes`.

vLLM's `reload_weights` is not used: it moves every layer to the meta device before it calls the model's
loader, so a source that fails the strict check would leave the engine with no weights at all.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bd3_plugin.core.checkpoint import CONFIG, WEIGHTS, CheckpointError, check_state_dict, read_config
from bd3_plugin.core.config import BD3Config
from bd3_plugin.core.model import BD3LM

EXTENSION = "vllm_backend.worker.weights.BD3WeightSync"
# The fields that fix the model's shapes and its decoding; dropout and the clip bounds may change in training
# (the learned bounds travel as tensors).
_ARCHITECTURE = ("model_type", "vocab_size", "model_length", "block_size", "hidden_dim", "n_heads", "n_blocks",
                 "cond_dim", "mask_id", "var_min")

Source = str | Path | Mapping[str, torch.Tensor]


class WeightUpdateError(RuntimeError):
    """An engine or server that cannot take a weight update (not a BD3 engine, no worker extension)."""


# ---- checks (pure: a source against a config) ----------------------------------------------------------
def weights_file(path: str | Path) -> Path:
    """The safetensors file of a checkpoint folder, or the given `.safetensors` file."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / WEIGHTS).is_file():
            raise CheckpointError(f"no {WEIGHTS} in {path}")
        return path / WEIGHTS
    if path.is_file() and path.suffix == ".safetensors":
        return path
    raise CheckpointError(f"{path} is neither a checkpoint folder nor a .safetensors file")


def check_config(new: BD3Config, running: BD3Config, where: str) -> None:
    """A checkpoint's config must describe the running model; the error names every differing field."""
    diffs = [f"{k} {getattr(new, k)!r} != {getattr(running, k)!r}" for k in _ARCHITECTURE
             if getattr(new, k) != getattr(running, k)]
    if diffs:
        raise CheckpointError(f"{where} does not describe the running model: {'; '.join(diffs)}")


def _tensors(state: Mapping) -> dict[str, torch.Tensor]:
    bad = sorted(str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(f"a state dict maps names to tensors; not tensors: {', '.join(bad)}")
    return dict(state)


def _header(file: Path) -> dict[str, torch.Tensor]:
    """Names and shapes from a safetensors header, as meta tensors (nothing is read from the data)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"cannot read {file}: {err}") from None


def check_source(source: Source, running: BD3Config) -> None:
    """Everything about a source that can be known without loading it into the engine."""
    if isinstance(source, Mapping):
        found = _tensors(source)
    else:
        file = weights_file(source)
        if file.parent == Path(source).expanduser() and (file.parent / CONFIG).is_file():
            check_config(read_config(file.parent), running, str(file.parent / CONFIG))
        found = _header(file)
    check_state_dict(_expected(running), found)


@functools.lru_cache(maxsize=4)
def _expected(cfg: BD3Config) -> dict[str, torch.Tensor]:
    """The checkpoint's names and shapes for a config, as meta tensors (the core model, allocating nothing)."""
    with torch.device("meta"):
        return BD3LM(cfg).state_dict()


def read_source(source: Source | bytes) -> dict[str, torch.Tensor]:
    """The tensors of a source; `bytes` are a serialized safetensors state dict (see `update_weights`)."""
    if isinstance(source, Mapping):
        return _tensors(source)
    from safetensors.torch import load, load_file

    if isinstance(source, bytes):
        try:
            return load(source)
        except Exception as err:
            raise CheckpointError(f"cannot read the serialized state dict: {err}") from None

    file = weights_file(source)
    try:
        return load_file(str(file))
    except Exception as err:
        raise CheckpointError(f"cannot read {file}: {err}") from None


def bd3_config(vllm_config) -> BD3Config:
    to_bd3 = getattr(vllm_config.model_config.hf_config, "to_bd3", None)
    if to_bd3 is None:
        raise WeightUpdateError(f"{vllm_config.model_config.model} is not a BD3 model")
    return to_bd3()


# ---- worker side -------------------------------------------------------------------------------------
def apply_weights(worker, source: Source | bytes) -> int:
    """Run in each worker: check, then copy the source into the model in place. Returns the tensor count."""
    if not isinstance(source, bytes):
        check_source(source, bd3_config(worker.vllm_config))
    state = read_source(source)
    with torch.no_grad():
        worker.model_runner.get_model().load_weights(state.items())  # checks again, then copies
    return len(state)


class BD3WeightSync:
    """The weight-update call of a BD3 worker. Both BD3 workers (CPU and GPU) have it as a direct base, so
    no flag is needed; naming it as `worker_extension_cls` as well is harmless (vLLM skips a class that is
    already a base)."""

    def bd3_update_weights(self, source: Source | bytes) -> int:
        return apply_weights(self, source)


def check_version(version: Any) -> str:
    if not isinstance(version, str) or not version:
        raise ValueError(f"version must be a non-empty string, got {version!r}")
    return version


def missing_extension(err: Exception) -> bool:
    """vLLM's answer when a worker has no `bd3_update_weights` (neither the extension nor a worker with it)."""
    message = str(err)  # the in-process and the multiprocess executors word it differently
    return "bd3_update_weights" in message and ("is not implemented" in message or "has no attribute" in message)


NO_EXTENSION = ("the engine's workers have no bd3_update_weights: serve a BD3 checkpoint, or give a custom "
                 f"worker worker_extension_cls={EXTENSION!r}")
