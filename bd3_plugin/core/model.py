"""The BD3-LM backbone: a DiT with rotary attention and adaLN (spec §1.4).

Parameter names follow the released checkpoints (`backbone.*`), so loading needs no renaming.
The model knows nothing about noise, samplers or loaders: it maps token ids, positions and an
attention mask (and optionally a KV cache of clean tokens) to logits.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bd3_plugin.core.cache import KVCache
from bd3_plugin.core.config import BD3Config
from bd3_plugin.core.masks import block_causal_mask, block_diff_mask, with_key_padding

_FREQ_DIM = 256  # width of the sinusoidal timestep embedding fed to sigma_map


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in fp32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), (x.shape[-1],))
        return (y * self.weight.float()).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def rotate_half(u: torch.Tensor) -> torch.Tensor:
    half = u.shape[-1] // 2
    return torch.cat((-u[..., half:], u[..., :half]), dim=-1)


class Rotary(nn.Module):
    """GPT-NeoX style rotary embedding over the full head dim, base 10000."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=True)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, 1, T, Dh) for integer positions (B, T)."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, Dh)
        return emb.cos(), emb.sin()


def apply_rotary(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (u.float() * cos + rotate_half(u.float()) * sin).to(u.dtype)


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(_FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = _FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device).float() / half)
        args = sigma[:, None].float() * freqs[None]  # (B, 128)
        return self.mlp(torch.cat((args.cos(), args.sin()), dim=-1).to(self.mlp[0].weight.dtype))


class EmbeddingLayer(nn.Module):
    """A raw parameter indexed by token id (the checkpoints name it `vocab_embed.embedding`)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[ids]


class DiTBlock(nn.Module):
    def __init__(self, cfg: BD3Config) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.norm1 = LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * d)
        self.dropout = nn.Dropout(cfg.dropout)

    def modulations(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """adaLN: (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (1, 1, D)."""
        return self.adaLN_modulation(c)[:, None].chunk(6, dim=2)

    def project_qkv(self, x: torch.Tensor, mods, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> rotated q, k and v, each (B, H, T, Dh)."""
        b, t, _ = x.shape
        h = modulate(self.norm1(x), mods[0], mods[1])
        qkv = self.attn_qkv(h).view(b, t, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T, Dh)
        return apply_rotary(q, *rope), apply_rotary(k, *rope), v

    def finish(self, x: torch.Tensor, a: torch.Tensor, mods) -> torch.Tensor:
        """Residual attention output a (B, T, D), then the MLP."""
        x = x + mods[2] * self.dropout(self.attn_out(a))
        return x + mods[5] * self.dropout(self.mlp(modulate(self.norm2(x), mods[3], mods[4])))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, D) -> x, and this call's rotated (k, v) so that a caller may cache them."""
        b, t, _ = x.shape
        mods = self.modulations(c)
        q, k, v = self.project_qkv(x, mods, rope)
        if prefix is not None:
            k_all = torch.cat((prefix[0], k), dim=2)
            v_all = torch.cat((prefix[1], v), dim=2)
        else:
            k_all = k
            v_all = v
        a = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, H, T, Dh)
        return self.finish(x, a.transpose(1, 2).reshape(b, t, -1), mods), (k, v)


class OutputLayer(nn.Module):
    def __init__(self, cfg: BD3Config) -> None:
        super().__init__()
        self.norm_final = LayerNorm(cfg.hidden_dim)
        self.linear = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTBackbone(nn.Module):
    def __init__(self, cfg: BD3Config) -> None:
        super().__init__()
        self.vocab_embed = EmbeddingLayer(cfg.vocab_size, cfg.hidden_dim)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.rotary_emb = Rotary(cfg.head_dim)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.n_blocks))
        self.output_layer = OutputLayer(cfg)

    def condition(self, device: torch.device) -> torch.Tensor:
        """Time conditioning is off in every released model: sigma is 0, so c is a learned constant (1, cond)."""
        return F.silu(self.sigma_map(torch.zeros(1, device=device)))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, store: int = 0, read: torch.Tensor | None = None
                ) -> torch.Tensor | None:
        """ids (B, T) -> logits (B, T, V). `store`: how many leading tokens' K/V to write into `cache`.
        `read` (B, T) bool: run the output layer only there and return those logits (n, V) in row-major
        order (None when n = 0); the vocabulary projection is the costliest layer per token."""
        c = self.condition(ids.device)
        x = self.vocab_embed(ids)
        rope = self.rotary_emb(positions)
        for i, block in enumerate(self.blocks):
            x, (k, v) = block(x, c, rope, mask, cache.prefix(i) if cache is not None else None)
            if store:
                cache.write(i, k[:, :, :store], v[:, :, :store])
        if read is None:
            return self.output_layer(x, c)
        if not read.any():
            return None
        return self.output_layer(x[read][None], c)[0]  # (1, n, D) -> (n, V)


class Clean(NamedTuple):
    """Whole clean blocks for a pass to store in the cache: ids, positions and validity, each (B, k·L')."""

    ids: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor


class BD3LM(nn.Module):
    """A BD3-LM with the three attention modes of the spec, sharing one mask definition."""

    def __init__(self, cfg: BD3Config) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = DiTBackbone(cfg)
        if cfg.var_min:
            self.register_buffer("sampling_eps_min", torch.tensor(cfg.sampling_eps_min))
            self.register_buffer("sampling_eps_max", torch.tensor(cfg.sampling_eps_max))
        self.reset_parameters()

    @property
    def device(self) -> torch.device:
        return self.backbone.vocab_embed.embedding.device

    def reset_parameters(self, generator: torch.Generator | None = None, adaln_zero: bool = True) -> None:
        """Training init: small normals, kaiming-uniform embedding, adaLN and output zeroed (adaLN-Zero).

        `adaln_zero=False` draws every weight, which tests use to get a non-trivial random function.
        """
        with torch.no_grad():
            for name, p in self.backbone.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                elif adaln_zero and ("adaLN_modulation" in name or name.startswith("output_layer.linear")):
                    p.zero_()
                elif name.endswith(".bias"):
                    if adaln_zero:
                        p.zero_()
                    else:
                        p.normal_(0.0, 0.02, generator=generator)
                elif name == "vocab_embed.embedding":
                    bound = 1.0 / math.sqrt(p.shape[1])  # kaiming_uniform(a=√5) on a (V, D) matrix
                    p.uniform_(-bound, bound, generator=generator)
                else:
                    p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=generator)

    # ---- the three modes ----------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Block-causal forward over a view (B, T) -> logits (B, T, V); no cache.

        Past model_length each block sees the previous model_length - L' tokens, as the cache window does.
        """
        b, t = ids.shape
        valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
        cfg = self.config
        mask = with_key_padding(block_causal_mask(t, cfg.block_size, ids.device, cfg.num_blocks), valid)
        positions = torch.arange(t, device=ids.device).expand(b, t)
        return self.backbone(ids, positions, mask)

    def forward_train(self, x_t: torch.Tensor, x_0: torch.Tensor, valid: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """One pass over x_t ⊕ x_0 (B, 2L) with the block-diffusion mask -> noisy-half logits (B, L, V)."""
        b, n = x_0.shape
        valid = torch.ones_like(x_0, dtype=torch.bool) if valid is None else valid
        mask = with_key_padding(block_diff_mask(n, self.config.block_size, x_0.device), valid.repeat(1, 2))
        positions = torch.arange(n, device=x_0.device).repeat(2).expand(b, 2 * n)  # both halves at 0..L-1
        return self.backbone(torch.cat((x_t, x_0), dim=1), positions, mask)[:, :n]

    def denoise(self, block: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                valid: torch.Tensor | None = None, *, read: torch.Tensor | None = None,
                clean: Clean | None = None) -> torch.Tensor:
        """Logits (B, L', V) of a noisy block attending to the cached clean prefix and to itself.

        `read` (B, L') bool: the output layer runs only at those slots; the other slots' logits are zeros.
        `clean`: whole clean blocks that come right before the noisy block, stored in the cache by this same
        pass (the commit fused into the denoising pass). They attend to the cache and block-causally to each
        other, exactly as in `commit`; the noisy block attends to the cache, to them and to itself, exactly
        as in a `denoise` after that commit: the clean stream never sees the noisy block (spec §2.1).
        """
        valid = torch.ones_like(block, dtype=torch.bool) if valid is None else valid
        read = torch.ones_like(valid) if read is None else read
        if clean is None:
            clean = Clean(block[:, :0], positions[:, :0], valid[:, :0])  # (B, 0): nothing to store
        (b, n), m = block.shape, clean.ids.shape[1]
        if m > self.config.block_size and cache.length + m > cache.capacity:
            raise ValueError(f"{m} clean tokens overflow the cache window ({cache.length} of "
                             f"{cache.capacity} in use): commit the leading blocks first")
        # As a commit pass would, or as a lone block would: the mask's window limits what the block sees.
        cache.make_room(m or n)
        new_valid = torch.cat((clean.valid, valid), dim=1)
        picked = self.backbone(torch.cat((clean.ids, block), dim=1), torch.cat((clean.positions, positions), dim=1),
                               self._window_mask(cache, new_valid), cache, store=m,
                               read=torch.cat((torch.zeros_like(clean.valid), read), dim=1))
        cache.advance(clean.valid)
        logits = torch.zeros(b, n, self.config.vocab_size, dtype=self.backbone.vocab_embed.embedding.dtype,
                             device=block.device)
        if picked is not None:
            logits[read] = picked
        return logits

    def commit(self, blocks: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               valid: torch.Tensor | None = None) -> None:
        """Store whole clean blocks (B, k·L') in the cache (block-causal among them); no logits are computed."""
        valid = torch.ones_like(blocks, dtype=torch.bool) if valid is None else valid
        n = blocks.shape[1]
        size = self.config.block_size
        if n > size and cache.length + n > cache.capacity:
            # The window slides inside this chunk: each block must see its own window, so go one by one.
            for i in range(0, n, size):
                self.commit(blocks[:, i : i + size], positions[:, i : i + size], cache, valid[:, i : i + size])
            return
        cache.make_room(n)
        self.backbone(blocks, positions, self._window_mask(cache, valid), cache, store=n, read=torch.zeros_like(valid))
        cache.advance(valid)

    def _window_mask(self, cache: KVCache, valid: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, length + T) for T new tokens (whole blocks) after the cache: block-causal, each block
        seeing at most the model_length / L' − 1 blocks before it (the sliding window), never padding."""
        cfg = self.config
        t = valid.shape[1]
        assert cache.length % cfg.block_size == 0, "the cache holds whole blocks"
        allowed = block_causal_mask(cache.length + t, cfg.block_size, valid.device, cfg.num_blocks,
                                    first_query=cache.length)
        return with_key_padding(allowed, torch.cat((cache.prefix_valid(), valid), dim=1))

    def new_cache(self, batch: int) -> KVCache:
        cfg = self.config
        p = self.backbone.vocab_embed.embedding
        return KVCache(n_layers=cfg.n_blocks, batch=batch, n_heads=cfg.n_heads, head_dim=cfg.head_dim,
                       capacity=cfg.model_length, dtype=p.dtype, device=p.device)
