"""Checkpoint I/O in the layout of the released BD3-LM checkpoints (config.json + model.safetensors
with `backbone.*` names + tokenizer files). Loading is native (no remote code) and strict."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bd3_plugin.core.config import BD3Config, ConfigError
from bd3_plugin.core.model import BD3LM

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt")
_GPT2_VOCAB = 50258  # GPT-2's 50257 ids + the mask: the released checkpoints ship no tokenizer files


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as written; the message names every problem."""


_HUB_ID = re.compile(r"[\w-][\w.-]*/[\w-][\w.-]*")


def is_hub_id(name: str) -> bool:
    """Whether a name that is no local path may be a hub id (owner/name); anything else can only be a
    local folder, so its absence is known without asking the hub."""
    return bool(_HUB_ID.fullmatch(name))


def checkpoint_folder(name_or_path: str | Path) -> Path:
    """A local checkpoint folder, or a Hugging Face hub id downloaded to the local cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint folder holding {CONFIG}")
    name = str(name_or_path)
    if not is_hub_id(name):
        raise CheckpointError(f"no checkpoint folder at {name}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=[CONFIG, WEIGHTS, *_TOKENIZER_FILES]))
    except Exception as err:  # the hub client raises many types; the user needs one line
        raise CheckpointError(f"{name} is neither a local folder nor a downloadable hub id: "
                              f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


def read_config(folder: Path) -> BD3Config:
    return BD3Config.from_json(folder / CONFIG)


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k} {tuple(found[k].shape)} != expected {tuple(expected[k].shape)}"
                    for k in set(expected) & set(found) if found[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if shapes:
        problems.append(f"mis-shaped tensors: {'; '.join(shapes)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + " | ".join(problems))


def load_model(name_or_path: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, config: BD3Config | None = None) -> BD3LM:
    """Build the model from config.json and load model.safetensors strictly."""
    from safetensors.torch import load_file

    folder = checkpoint_folder(name_or_path)
    cfg = config or read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS} in {folder}")
    try:
        state = load_file(str(weights))
    except Exception as err:
        raise CheckpointError(f"cannot read {weights}: {err}") from None
    with torch.device("meta"):
        model = BD3LM(cfg)
    check_state_dict(model.state_dict(), state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def save_checkpoint(model: BD3LM, folder: str | Path, tokenizer: Any | None = None,
                    extra_config: dict[str, Any] | None = None) -> Path:
    """Write config.json, model.safetensors (fp32) and the tokenizer's files; reloads bit-identically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    cfg = model.config.to_dict() | (extra_config or {})
    (folder / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def load_tokenizer(folder: Path, config: BD3Config):
    """The checkpoint's own tokenizer files, or GPT-2's for the released OWT checkpoints (vocab 50258)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    if config.vocab_size == _GPT2_VOCAB:
        return AutoTokenizer.from_pretrained("gpt2")
    raise CheckpointError(f"no tokenizer files in {folder} and vocab_size {config.vocab_size} is not GPT-2's")


@dataclass
class Checkpoint:
    """A loaded model with its tokenizer and the ids the samplers need."""

    path: Path
    model: BD3LM
    tokenizer: Any

    @property
    def config(self) -> BD3Config:
        return self.model.config

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def load_checkpoint(name_or_path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Checkpoint:
    folder = checkpoint_folder(name_or_path)
    model = load_model(folder, device=device, dtype=dtype)
    return Checkpoint(folder, model, load_tokenizer(folder, model.config))


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "check_state_dict", "load_checkpoint", "load_model",
           "load_tokenizer", "read_config", "checkpoint_folder", "save_checkpoint"]
