"""A transformers config class for `model_type: bd3lm` / `mdlm`, so that vLLM parses the released
config.json natively (no remote code). vLLM reads hidden_size, num_attention_heads, num_hidden_layers and
max_position_embeddings; the attribute map points them at the BD3 names."""
from __future__ import annotations

from transformers import PretrainedConfig

from bd3_plugin.core.config import BD3Config

ACTIVE_BLOCK_SIZE: int | None = None  # set once a BD3 config is parsed in this process (a BD3 server)
ACTIVE_VOCAB_SIZE: int | None = None  # likewise, from a checkpoint's config (not a default-constructed one)

_ALIASES = {"hidden_size": "hidden_dim", "num_attention_heads": "n_heads", "num_hidden_layers": "n_blocks",
            "max_position_embeddings": "model_length"}


class BD3HFConfig(PretrainedConfig):
    model_type = "bd3lm"
    attribute_map = _ALIASES

    def __init__(self, vocab_size: int = 50258, model_length: int = 1024, block_size: int = 4,
                 hidden_dim: int = 768, n_heads: int = 12, n_blocks: int = 12, cond_dim: int = 128,
                 dropout: float = 0.1, mask_token_id: int | None = None, var_min: bool = False,
                 sampling_eps_min: float = 1e-3, sampling_eps_max: float = 1.0, **kwargs) -> None:
        self.vocab_size, self.model_length, self.block_size = vocab_size, model_length, block_size
        self.hidden_dim, self.n_heads, self.n_blocks, self.cond_dim = hidden_dim, n_heads, n_blocks, cond_dim
        self.dropout, self.mask_token_id, self.var_min = dropout, mask_token_id, var_min
        self.sampling_eps_min, self.sampling_eps_max = sampling_eps_min, sampling_eps_max
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        global ACTIVE_BLOCK_SIZE, ACTIVE_VOCAB_SIZE
        # transformers also builds default instances (e.g. to diff against): only a checkpoint's config
        # (it names its architectures) sets the active values, or the first config seen when none does.
        if "architectures" in kwargs or ACTIVE_BLOCK_SIZE is None:
            ACTIVE_BLOCK_SIZE = block_size
        if "architectures" in kwargs:
            ACTIVE_VOCAB_SIZE = vocab_size

    def to_bd3(self) -> BD3Config:
        """The core's config: the one validation of every field."""
        raw = {k: getattr(self, k) for k in ("vocab_size", "model_length", "block_size", "hidden_dim", "n_heads",
                                             "n_blocks", "cond_dim", "dropout", "mask_token_id", "var_min",
                                             "sampling_eps_min", "sampling_eps_max")}
        for key in ("adaln", "time_conditioning", "causal"):
            if hasattr(self, key):
                raw[key] = getattr(self, key)
        return BD3Config.from_dict(raw | {"model_type": self.model_type})


class MDLMHFConfig(BD3HFConfig):
    model_type = "mdlm"

    def __init__(self, model_length: int = 1024, block_size: int | None = None, **kwargs) -> None:
        super().__init__(model_length=model_length, block_size=block_size or model_length, **kwargs)
