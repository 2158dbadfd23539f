"""The random-weight model the core benchmarks share: 4 layers × 128, vocabulary 1024, L = 256, L' = 16."""
from __future__ import annotations

import torch

from bd3_plugin.core.config import BD3Config
from bd3_plugin.core.model import BD3LM


def bench_model(device: str = "cpu", dtype: torch.dtype = torch.float32) -> BD3LM:
    cfg = BD3Config(vocab_size=1024, model_length=256, block_size=16, hidden_dim=128, n_heads=4, n_blocks=4,
                    cond_dim=64, dropout=0.0)
    model = BD3LM(cfg)
    model.reset_parameters(torch.Generator().manual_seed(0), adaln_zero=False)
    return model.eval().to(device=device, dtype=dtype)
