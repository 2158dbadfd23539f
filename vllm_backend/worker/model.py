"""BD3-LM as a vLLM model: the core's DiT modules, with vLLM's Attention on the paged KV cache.

Parameter names are the checkpoint's (`backbone.*`), so `load_weights` maps names one to one. The
attention layers are causal or not as the runner's metadata says; the model itself is one pass of the
backbone over the scheduled tokens and returns hidden states; `compute_logits` applies the output layer.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from bd3_plugin.core.checkpoint import check_state_dict
from bd3_plugin.core.config import BD3Config
from bd3_plugin.core.model import DiTBackbone, DiTBlock
from vllm_backend.worker.engine import WORKERS, BD3Scheduler


class VLLMDiTBlock(DiTBlock):
    """The core block with its attention op replaced by vLLM's (which writes K/V into the paged cache)."""

    def __init__(self, cfg: BD3Config, cache_config, prefix: str) -> None:
        super().__init__(cfg)
        self.attn = Attention(cfg.n_heads, cfg.head_dim, cfg.head_dim**-0.5, num_kv_heads=cfg.n_heads,
                              cache_config=cache_config, prefix=f"{prefix}.attn")

    def forward_flat(self, x: torch.Tensor, mods: tuple[torch.Tensor, ...], rope) -> torch.Tensor:
        """x (1, T, D) over the step's flattened tokens, this block's adaLN modulations -> (1, T, D)."""
        t = x.shape[1]
        q, k, v = self.project_qkv(x, mods, rope)  # (1, H, T, Dh)
        flat = [u[0].transpose(0, 1).reshape(t, -1) for u in (q, k, v)]  # (T, H·Dh)
        a = self.attn(*flat)  # (T, H·Dh)
        return self.finish(x, a[None], mods)


def check_block_decoding(vllm_config: VllmConfig) -> None:
    """Refuse an engine configured without block decoding: vLLM's stock worker and scheduler would run the
    model as an autoregressive one and answer garbage. The plugin configures every engine whose checkpoint
    config it reads before vLLM does; this catches the others, whatever configured them."""
    worker = vllm_config.parallel_config.worker_cls
    scheduler = vllm_config.scheduler_config.get_scheduler_cls()
    if worker not in WORKERS.values() or not issubclass(scheduler, BD3Scheduler):
        raise ValueError(f"a BD3 checkpoint on an engine not configured for block decoding (worker {worker}, "
                         f"scheduler {scheduler.__name__}): pass vllm_backend.worker.engine.engine_kwargs(block_size, "
                         "device) to vllm.LLM, or start it from a folder or hub id whose config.json bd3-plugin "
                         "can read (vllm serve / vllm.LLM configure those)")


class BD3ForVLLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        check_block_decoding(vllm_config)
        hf = vllm_config.model_config.hf_config
        cfg = hf.to_bd3()
        self.config = cfg
        self.backbone = DiTBackbone(cfg)
        stem = f"{prefix}.backbone" if prefix else "backbone"
        self.backbone.blocks = nn.ModuleList(
            VLLMDiTBlock(cfg, vllm_config.cache_config, f"{stem}.blocks.{i}") for i in range(cfg.n_blocks))
        if cfg.var_min:  # learned clip bounds: kept so that every checkpoint tensor has a home
            self.register_buffer("sampling_eps_min", torch.tensor(cfg.sampling_eps_min))
            self.register_buffer("sampling_eps_max", torch.tensor(cfg.sampling_eps_max))
        self._conditioning = None  # (device, dtype, c, every block's modulations): see conditioning()

    def conditioning(self, like: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """The time conditioning c (1, cond) and every block's adaLN modulations. Sigma is 0 in every
        released model, so they are constants of the weights: computed once (a runner makes several
        passes per step), again after `load_weights` or on another device or dtype."""
        cached = self._conditioning
        if cached is None or cached[:2] != (like.device, like.dtype):
            c = self.backbone.condition(like.device).to(like.dtype)
            cached = (like.device, like.dtype, c, [block.modulations(c) for block in self.backbone.blocks])
            self._conditioning = cached
        return cached[2], cached[3]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.vocab_embed(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Flat token ids and positions (T,) -> hidden states (T, D) before the output layer."""
        x = (self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds)[None]  # (1, T, D)
        _, mods = self.conditioning(x)
        rope = self.backbone.rotary_emb(positions[None])
        for block, block_mods in zip(self.backbone.blocks, mods):
            x = block.forward_flat(x, block_mods, rope)
        return x[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        c, _ = self.conditioning(hidden_states)
        return self.backbone.output_layer(hidden_states[None], c)[0].float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Strict, as the core's loader: one error names every missing, unexpected and mis-shaped tensor.
        Returns the parameter names loaded, which vLLM checks against the model's parameters."""
        found = dict(weights)
        self._conditioning = None  # recomputed from the new weights
        # vLLM's Attention layers keep buffers of their own (KV scales) that no checkpoint holds.
        expected = {k: v for k, v in self.state_dict().items() if ".attn." not in k}
        check_state_dict(expected, found)
        params = dict(self.named_parameters())
        for name, tensor in found.items():
            if name in params:
                default_weight_loader(params[name], tensor)
            else:
                expected[name].copy_(tensor)  # a buffer: state_dict() shares its storage
        return set(params)
