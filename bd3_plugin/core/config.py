"""Model configuration, read from and written to the `config.json` of the released BD3-LM checkpoints."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Keys of the released config.json files that describe packaging or training, not the network.
_IGNORED_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "attn_backend", "return_dict", "torch_dtype",
    "transformers_version", "tie_word_embeddings", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id",
})
_MODEL_TYPES = ("bd3lm", "mdlm")


class ConfigError(ValueError):
    """A config.json that does not describe a BD3-LM this package can run."""


@dataclass(frozen=True)
class BD3Config:
    """Shape and behaviour of a BD3-LM backbone (spec §1.1, §1.5).

    `block_size == model_length` is MDLM, `block_size == 1` is an AR model over the same backbone.
    """

    vocab_size: int = 50258
    model_length: int = 1024
    block_size: int = 4
    hidden_dim: int = 768
    n_heads: int = 12
    n_blocks: int = 12
    cond_dim: int = 128
    dropout: float = 0.1
    mask_token_id: int | None = None  # released checkpoints: the last id (GPT-2's 50257)
    var_min: bool = False  # the checkpoint carries learned clip bounds as buffers
    sampling_eps_min: float = 1e-3
    sampling_eps_max: float = 1.0
    model_type: str = "bd3lm"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "model_length", "block_size", "hidden_dim", "n_heads", "n_blocks",
                     "cond_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.model_length % self.block_size:
            raise ConfigError(f"block_size {self.block_size} does not divide model_length {self.model_length}")
        if self.hidden_dim % self.n_heads:
            raise ConfigError(f"n_heads {self.n_heads} does not divide hidden_dim {self.hidden_dim}")
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.sampling_eps_min <= self.sampling_eps_max <= 1.0:
            raise ConfigError(f"need 0 <= sampling_eps_min <= sampling_eps_max <= 1, got "
                              f"({self.sampling_eps_min}, {self.sampling_eps_max})")
        if self.model_type not in _MODEL_TYPES:
            raise ConfigError(f"model_type must be one of {_MODEL_TYPES}, got {self.model_type!r}")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ConfigError(f"mask_token_id {self.mask_token_id} outside the vocabulary of {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads

    @property
    def mask_id(self) -> int:
        return self.vocab_size - 1 if self.mask_token_id is None else self.mask_token_id

    @property
    def num_blocks(self) -> int:
        return self.model_length // self.block_size

    def replace(self, **changes: Any) -> "BD3Config":
        return dataclasses.replace(self, **changes)

    # ---- config.json ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "BD3Config":
        model_type = raw.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ConfigError(f"not a BD3-LM config: model_type is {model_type!r}, expected one of {_MODEL_TYPES}")
        raw = dict(raw)
        for key, expected in (("adaln", True), ("time_conditioning", False), ("causal", False)):
            if key in raw and raw.pop(key) != expected:
                raise ConfigError(f"{key}={not expected} is not supported (released checkpoints use {key}={expected})")
        raw.pop("cross_attn", None)  # the 2L training pass is how NELBO is computed; nothing to switch
        if model_type == "mdlm":
            raw.setdefault("block_size", raw.get("model_length", cls.model_length))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in fields and k not in _IGNORED_KEYS)
        if unknown:
            warnings.warn(f"config.json keys ignored: {', '.join(unknown)}", stacklevel=2)
        kwargs = {k: v for k, v in raw.items() if k in fields}
        for key in ("sampling_eps_min", "sampling_eps_max", "dropout"):
            if key in kwargs:
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)

    @staticmethod
    def describes(raw: dict[str, Any]) -> bool:
        """Whether a parsed config.json is a BD3-LM's (bd3lm or mdlm), valid or not."""
        return isinstance(raw, dict) and raw.get("model_type") in _MODEL_TYPES

    @classmethod
    def from_json(cls, path: str | Path) -> "BD3Config":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The released layout (spec §1.5), plus `mask_token_id` when it is not the last id."""
        out: dict[str, Any] = {
            "architectures": ["BD3LM"] if self.model_type == "bd3lm" else ["MDLM"],
            "model_type": self.model_type,
            "block_size": self.block_size,
            "model_length": self.model_length,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_blocks": self.n_blocks,
            "cond_dim": self.cond_dim,
            "vocab_size": self.vocab_size,
            "dropout": self.dropout,
            "time_conditioning": False,
            "adaln": True,
            "causal": False,
            "cross_attn": True,
            "var_min": self.var_min,
            "sampling_eps_min": self.sampling_eps_min,
            "sampling_eps_max": self.sampling_eps_max,
            "torch_dtype": "float32",
        }
        if self.mask_token_id is not None:
            out["mask_token_id"] = self.mask_token_id
        return out
