"""NLL of texts under a Hugging Face causal LM in sliding windows: the judge of generative perplexity.

As in the reference (GPT-2 Large, context 1024, stride 512): the first window scores every position but
the first; each later window starts `stride` tokens after the previous one and scores only the positions
the previous window did not reach. Targets equal to the scorer's EOS are left out of the average.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class ScorerError(ValueError):
    pass


@dataclass(frozen=True)
class SampleScore:
    nll: float  # Σ −log p over the scored tokens, nats (inf if a token is impossible)
    tokens: int  # scored tokens (EOS targets excluded)
    valid: bool | None = None  # only the tiny world's source knows: every token possible
    documents: int = 0  # the source only: complete documents (ending in EOS) in the sample
    valid_documents: int = 0


def sliding_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first) for a sequence of n tokens: the window is [start, end) and scores the targets
    [first, end), each predicted from the tokens before it inside the window."""
    if not 0 < stride <= context:
        raise ValueError(f"stride must lie in [1, context={context}], got {stride}")
    if n < 2:
        return []
    out = [(0, min(context, n), 1)]
    while out[-1][1] < n:
        start = len(out) * stride
        out.append((start, min(start + context, n), out[-1][1]))
    return out


class CausalLMScorer:
    """A causal LM and its tokenizer, loaded by name or path (e.g. `gpt2-large`, the paper's)."""

    def __init__(self, name: str, device: str = "cpu", stride: int | None = None) -> None:
        from huggingface_hub.utils import logging as hub_logging
        from transformers import AutoModelForCausalLM, AutoTokenizer

        verbosity = hub_logging.get_verbosity()
        hub_logging.set_verbosity_error()  # a failed load is reported once, below, not per retry
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForCausalLM.from_pretrained(name).to(device).eval()
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ScorerError(f"cannot load the scorer {name!r}: {first}") from None
        finally:
            hub_logging.set_verbosity(verbosity)
        cfg = self.model.config
        self.name = name
        self.device = device
        self.context = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1024
        self.stride = stride if stride is not None else max(self.context // 2, 1)
        if not 0 < self.stride <= self.context:
            raise ScorerError(f"--stride must lie in [1, {self.context}] (the scorer's context), got {self.stride}")

    def encode(self, text: str, max_length: int) -> list[int]:
        """Retokenise a sample's text; like the reference, keep at most `max_length` tokens."""
        return self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]

    @torch.no_grad()
    def score(self, texts: Sequence[str], max_length: int) -> list[SampleScore]:
        eos = self.tokenizer.eos_token_id
        out = []
        for text in texts:
            ids = self.encode(text, max_length)
            nll = 0.0
            count = 0
            for start, end, first in sliding_windows(len(ids), self.context, self.stride):
                x = torch.tensor([ids[start:end]], device=self.device)
                logp = self.model(x).logits[0].float().log_softmax(-1)  # (end − start, V)
                targets = x[0, first - start :]
                lp = logp[first - start - 1 : end - start - 1].gather(1, targets[:, None])[:, 0]
                keep = targets != eos if eos is not None else torch.ones_like(targets, dtype=torch.bool)
                nll -= float(lp[keep].double().sum())
                count += int(keep.sum())
            out.append(SampleScore(nll, count))
        return out
