"""A transformers config class for `model_type: bd3lm` / `mdlm`, so that vLLM parses the released
config.json natively (no remote code). vLLM reads hidden_size, num_attention_heads, num_hidden_layers and
max_position_embeddings; the attribute map points them at the BD3 names."""
from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from bd3_plugin.core.config import BD3Config

ACTIVE_BLOCK_SIZE: int | None = None  # set once a BD3 config is parsed in this process (a BD3 server)
ACTIVE_VOCAB_SIZE: int | None = None  # likewise, from a checkpoint's config (not a default-constructed one)

_ALIASES = {"hidden_size": "hidden_dim", "num_attention_heads": "n_heads", "num_hidden_layers": "n_blocks",
            "max_position_embeddings": "model_length"}


# The network's fields, their defaults and their validation are the core's (`BD3Config`): one source.
_FIELDS = {f.name: f.default for f in dataclasses.fields(BD3Config) if f.name != "model_type"}


class BD3HFConfig(PretrainedConfig):
    model_type = "bd3lm"
    attribute_map = _ALIASES

    def __init__(self, **kwargs) -> None:
        for name, default in _FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        global ACTIVE_BLOCK_SIZE, ACTIVE_VOCAB_SIZE
        # transformers also builds default instances (e.g. to diff against): only a checkpoint's config
        # (it names its architectures) sets the active values, or the first config seen when none does.
        if "architectures" in kwargs or ACTIVE_BLOCK_SIZE is None:
            ACTIVE_BLOCK_SIZE = self.block_size
        if "architectures" in kwargs:
            ACTIVE_VOCAB_SIZE = self.vocab_size

    def to_bd3(self) -> BD3Config:
        """The core's config: the one validation of every field."""
        raw = {k: getattr(self, k) for k in _FIELDS}
        for key in ("adaln", "time_conditioning", "causal"):
            if hasattr(self, key):
                raw[key] = getattr(self, key)
        return BD3Config.from_dict(raw | {"model_type": self.model_type})


class MDLMHFConfig(BD3HFConfig):
    model_type = "mdlm"

    def __init__(self, **kwargs) -> None:
        # An MDLM is one block as long as the model (the core's `BD3Config.from_dict` says the same).
        kwargs.setdefault("model_length", _FIELDS["model_length"])
        kwargs["block_size"] = kwargs.get("block_size") or kwargs["model_length"]
        super().__init__(**kwargs)
