"""The model and everything it needs, nothing above it: `BD3Config` (config.json), the block-diffusion
attention masks, the KV cache of clean blocks, the backbone `BD3LM`, strict checkpoint I/O, the SUBS
parameterisation (`subs_log_probs`, the one place the mask token is taken out of a distribution), and
per-row random generators.
"""
from bd3_plugin._exports import lazy_exports

_EXPORTS = {
    "BD3Config": "config",
    "ConfigError": "config",
    "BD3LM": "model",
    "KVCache": "cache",
    "Checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "read_config": "checkpoint",
    "checkpoint_folder": "checkpoint",
    "block_diff_mask": "masks",
    "block_causal_mask": "masks",
    "subs_log_probs": "subs",
    "subs_logits": "subs",
    "NEG_INF": "subs",
    "Generators": "generators",
    "seeded_generators": "generators",
    "per_row": "generators",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
