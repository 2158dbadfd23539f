"""What a generated token costs in multiply-accumulates, from the token positions a model computes through
its layers and through its output layer: the arithmetic `bench_vllm.py` prints beside a measured BD3/AR
speed ratio. Only the linear layers are counted; attention scores add 2·d·context per position and layer,
under 2% of a layer at the contexts of the bench (≤ 128) and the width of the released checkpoints."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PositionCost:
    """Multiply-accumulates per token position."""

    layers: int  # through all the transformer layers
    output: int  # through the output layer (hidden -> vocabulary logits)

    def __post_init__(self) -> None:
        if self.layers <= 0 or self.output <= 0:
            raise ValueError(f"costs must be positive, got layers {self.layers}, output {self.output}")

    def per_token(self, layer_positions: float, output_positions: float) -> float:
        return layer_positions * self.layers + output_positions * self.output


def dit_cost(cfg) -> PositionCost:
    """A BD3 DiT layer: q, k, v and out projections (4·d²) and a GELU MLP of width 4d (8·d²); the adaLN
    modulation is computed once per sequence, not per position."""
    d = cfg.hidden_dim
    return PositionCost(layers=cfg.n_blocks * 12 * d * d, output=d * cfg.vocab_size)


def llama_cost(cfg) -> PositionCost:
    """The bench's Llama of the same width, depth and vocabulary: q, k, v, o (4·d²) and a gated MLP of
    width 4d (three matrices, 12·d²)."""
    d = cfg.hidden_dim
    return PositionCost(layers=cfg.n_blocks * 16 * d * d, output=d * cfg.vocab_size)


def first_hitting_positions(block_size: int, fused_commit: bool) -> tuple[float, float]:
    """(layer positions, output-layer positions) per generated token for first-hitting decoding, prompt
    excluded. First-hitting reveals one token per pass, so a block of L' takes L' passes over its L'
    positions, and its clean K/V cost L' more positions: in a commit pass of its own, or inside the next
    block's first pass (fused). The logits: the whole block on each pass, plus the L' + 1 positions vLLM's
    speculative-decoding path reads at the commit pass; or only the position each pass reveals (fused
    commit, logits where they are read)."""
    size = block_size
    layers = (size * size + size) / size  # = L' + 1 in both designs
    output = 1.0 if fused_commit else (size * size + size + 1) / size
    return layers, output


def predicted_ratio(bd3: PositionCost, bd3_positions: tuple[float, float], ar: PositionCost,
                    ar_positions: tuple[float, float]) -> float:
    """BD3 tokens/s over AR tokens/s if both were bound by their multiply-accumulates."""
    return ar.per_token(*ar_positions) / bd3.per_token(*bd3_positions)
