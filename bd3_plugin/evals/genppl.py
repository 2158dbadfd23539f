"""Generative perplexity, the paper's sample-quality metric (reference: metrics.py, diffusion.py `_sample`).

Unconditional samples of a fixed length (BOS included) start from `[BOS]` and are generated through any
EOS. After every block, once the sample is longer than the entropy window, the unigram entropy of its last
`window` tokens is checked: below the threshold the sample is degenerate, and it is thrown away and drawn
again (at most `max_tries` draws). Each kept sample is decoded to text, BOS included, retokenised by the
scorer and scored; EOS targets are left out. The paper's number is the mean over samples of each sample's
perplexity; the pooled perplexity (all tokens of all samples) is reported beside it.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bd3_plugin.evals.causal_scoring import CausalLMScorer, SampleScore
from bd3_plugin.sampling.config import SamplerConfig
from bd3_plugin.sampling.registry import SAMPLERS
from bd3_plugin.sampling.generate import generate, unigram_entropy
from bd3_plugin.core.model import BD3LM
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.likelihood.scoring import content_seed

# The paper's gen-PPL run: first-hitting, nucleus 0.9, no temperature. The reference's DDPM uses
# T = 5000 grid points per block; `steps=S` here reveals on the grid 1 − i/S, close to its T = S + 1.
PRESETS = {"paper": {"algorithm": "first_hitting", "top_p": 0.9, "temperature": 1.0, "steps": 5000}}


@dataclass(frozen=True)
class GenPPLConfig:
    length: int  # tokens per sample, the leading BOS included
    num_samples: int = 300
    batch_size: int = 16
    entropy_threshold: float = 4.0  # nats; 0 turns rejection off
    entropy_window: int = 256
    max_tries: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("length", "num_samples", "batch_size", "entropy_window", "max_tries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.length < 2:
            raise ValueError(f"length must be at least 2 (BOS and one token), got {self.length}")
        if not (isinstance(self.entropy_threshold, (int, float)) and self.entropy_threshold >= 0):
            raise ValueError(f"entropy_threshold must be a number >= 0, got {self.entropy_threshold!r}")


def sampler_config(preset: str | None = None, **overrides) -> SamplerConfig:
    """Sampler settings: SamplerConfig's defaults, then the preset's, then any explicit (non-None) value."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    settings = dict(PRESETS.get(preset, {}))
    names = (settings.get("algorithm"), overrides.get("algorithm"))
    if not any(name in SAMPLERS and SAMPLERS[name].uses_grid for name in names):
        settings.pop("steps", None)  # only a sampler that steps on a grid (DDPM) has a step count
    settings |= {k: v for k, v in overrides.items() if v is not None}
    return SamplerConfig(**settings)


def rejected(ids: Sequence[int], block_size: int, threshold: float, window: int) -> bool:
    """The reference's rule: after each block (ends at multiples of L'), if the sample is longer than
    `window`, its last `window` tokens must have unigram entropy ≥ threshold."""
    ends = range(block_size, len(ids) + 1, block_size)
    return any(e > window and unigram_entropy(ids[e - window : e]) < threshold for e in ends)


def fixed_length_sampler(sampler: SamplerConfig, length: int) -> SamplerConfig:
    """`length` tokens with the BOS, generated through any EOS; rejection is decided after generation."""
    return dataclasses.replace(sampler, max_new_tokens=length - 1, stop_at_eos=False, entropy_stop=None)


@dataclass
class Draws:
    samples: list[list[int]]  # token ids, BOS first, `length` each
    nfes: list[int]  # denoising forward passes of each kept draw
    tries: list[int]  # draws each sample took
    exhausted: int  # samples kept although every one of their draws was rejected
    forward_passes: int  # batched passes of every draw, rejected ones and commits included


def draw_samples(model: BD3LM, bos_id: int, sampler: SamplerConfig, cfg: GenPPLConfig,
                 progress: Callable[[int], None] | None = None) -> Draws:
    """`cfg.num_samples` fixed-length samples; sample i's draw k is seeded from (seed, i, k), so samples do
    not depend on the batch size."""
    block = model.config.block_size
    if cfg.length % block:
        raise ValueError(f"length {cfg.length} is not a multiple of the block size {block}")
    sampler = fixed_length_sampler(sampler, cfg.length)
    n = cfg.num_samples
    samples = [[] for _ in range(n)]
    nfes = [0] * n
    tries = [0] * n
    exhausted = 0
    passes = 0
    pending = list(range(n))
    while pending:
        retry = []
        for start in range(0, len(pending), cfg.batch_size):
            batch = pending[start : start + cfg.batch_size]
            gens = seeded_generators([content_seed(cfg.seed, i, tries[i]) for i in batch])
            out = generate(model, [[bos_id]] * len(batch), sampler, gens)
            passes += out.forward_passes
            for i, g in zip(batch, out.generations):
                tries[i] += 1
                ids = [bos_id] + g.tokens
                bad = cfg.entropy_threshold > 0 and rejected(ids, block, cfg.entropy_threshold, cfg.entropy_window)
                if bad and tries[i] < cfg.max_tries:
                    retry.append(i)
                    continue
                samples[i] = ids
                nfes[i] = g.denoise_steps
                exhausted += bad
                if progress:
                    progress(1)
        pending = retry
    return Draws(samples, nfes, tries, exhausted, passes)


class SourceScorer:
    """The tiny world's exact source: retokenisation is splitting the text into words."""

    name = "source"

    def __init__(self) -> None:
        from bd3_plugin.tinyworld.grammar import Source

        self.source = Source()

    def score(self, texts: Sequence[str], max_length: int) -> list[SampleScore]:
        from bd3_plugin.tinyworld.grammar import EOS
        from bd3_plugin.tinyworld.stream import document_validity, stream_logprobs

        out = []
        for text in texts:
            words = text.split()[:max_length]
            lps = stream_logprobs(self.source, words)
            valid = all(lp is not None and math.isfinite(lp) for lp in lps)
            kept = [lp for w, lp in zip(words[1:], lps) if w != EOS]
            nll, count = (-sum(kept), len(kept)) if valid else (math.inf, 0)
            good, docs = document_validity(words, lps)
            out.append(SampleScore(nll, count, valid, docs, good))
        return out


def make_scorer(name: str, device: str = "cpu", stride: int | None = None):
    return SourceScorer() if name == "source" else CausalLMScorer(name, device=device, stride=stride)


def summarise(draws: Draws, scores: Sequence[SampleScore]) -> dict:
    """The paper's gen-PPL (mean of per-sample perplexities) and the numbers around it."""
    per_sample = [math.exp(s.nll / s.tokens) if s.tokens and math.isfinite(s.nll) else math.inf for s in scores]
    finite = [s for s in scores if math.isfinite(s.nll) and s.tokens]
    total_nll = sum(s.nll for s in finite)
    total_tok = sum(s.tokens for s in finite)
    n = len(scores)
    out = {
        "gen_ppl": sum(per_sample) / n,
        "pooled_ppl": math.exp(total_nll / total_tok) if total_tok and len(finite) == n else math.inf,
        "nll_per_token": total_nll / total_tok if total_tok and len(finite) == n else math.inf,
        "scored_tokens": sum(s.tokens for s in scores),
        "samples": n,
        "mean_nfe": sum(draws.nfes) / n,
        "mean_entropy": sum(unigram_entropy(x) for x in draws.samples) / n,
        "draws": sum(draws.tries),
        "rejected_draws": sum(draws.tries) - n + draws.exhausted,
        "exhausted": draws.exhausted,
        "forward_passes": draws.forward_passes,
        "per_sample_ppl": per_sample,
    }
    if scores and scores[0].valid is not None:
        valid = [p for p, s in zip(per_sample, scores) if s.valid]
        docs = sum(s.documents for s in scores)
        out |= {"valid_fraction": len(valid) / n,
                "gen_ppl_valid": sum(valid) / len(valid) if valid else math.inf,
                "valid_documents": sum(s.valid_documents for s in scores) / docs if docs else math.nan}
    return out


@dataclass
class GenPPLResult:
    report: dict  # summarise()'s numbers and the settings they come from
    texts: list[str]  # each sample decoded, BOS included: what the scorer read
    scores: list[SampleScore]
    draws: Draws


def generative_perplexity(ckpt, scorer, sampler: SamplerConfig, cfg: GenPPLConfig,
                          progress: Callable[[int], None] | None = None) -> GenPPLResult:
    """The whole protocol for a loaded checkpoint (`checkpoint.Checkpoint`) and a scorer (`make_scorer`)."""
    tok = ckpt.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos is None:
        raise ValueError("the checkpoint's tokenizer has neither a BOS nor an EOS token to start samples from")
    draws = draw_samples(ckpt.model, bos, sampler, cfg, progress=progress)
    texts = [ckpt.decode(x) for x in draws.samples]
    scores = scorer.score(texts, cfg.length)
    report = {"block_size": ckpt.config.block_size, "length": cfg.length,
              "sampler": dataclasses.asdict(fixed_length_sampler(sampler, cfg.length)),
              "entropy_threshold": cfg.entropy_threshold, "entropy_window": cfg.entropy_window,
              "max_tries": cfg.max_tries, "seed": cfg.seed} | summarise(draws, scores)
    return GenPPLResult(report, texts, scores, draws)
