"""How well a checkpoint solves the copy task, and how many tokens each denoising pass reveals."""
from __future__ import annotations

from dataclasses import dataclass, replace

from bd3_plugin.sampling.config import SamplerConfig

from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.tinyworld.copying import CopySource
from bd3_plugin.tinyworld.grammar import EOS
from bd3_plugin.tinyworld.data import CopyItem


@dataclass(frozen=True)
class CopyScore:
    items: int
    correct: float  # fraction of answers equal to the copy, EOS included
    answer_tokens: int  # tokens revealed in the answers (the words and EOS, when reached)
    row_passes: int  # denoising passes summed over rows (each row counts the passes in which it had masks)
    batch_passes: int  # batched denoising passes of the whole run
    batch_commits: int  # batched passes that stored clean blocks (the prompt's included)

    @property
    def tokens_per_pass(self) -> float:
        """Answer tokens per denoising pass of a row: what a single request sees."""
        return self.answer_tokens / max(self.row_passes, 1)


def solve(ckpt, items: list[CopyItem], sampler: SamplerConfig, seed: int = 0,
          source: CopySource | None = None) -> CopyScore:
    """Generate an answer after every prompt (EOS first, as in training) and check it exactly.

    The answer budget is the answer's own length, so a model that misses EOS stops where the answer
    should have ended instead of decoding further blocks."""
    source = source or CopySource()
    eos = ckpt.eos_id
    prompts = [[eos] + ckpt.encode(item.prompt) for item in items]
    config = replace(sampler, max_new_tokens=source.config.answer_tokens)
    out = generate(ckpt.model, prompts, config, seeded_generators([seed + i for i in range(len(items))]),
                   eos_id=eos)
    correct = 0
    tokens = 0
    passes = 0
    for item, g in zip(items, out.generations):
        hit_eos = g.finish_reason == "eos"
        words = ckpt.tokenizer.convert_ids_to_tokens(g.tokens) + ([EOS] if hit_eos else [])
        correct += source.is_correct(item.prompt.split(), words)
        tokens += len(words)
        passes += g.denoise_steps
    return CopyScore(len(items), correct / len(items), tokens, passes, out.denoise_passes, out.commit_passes)
