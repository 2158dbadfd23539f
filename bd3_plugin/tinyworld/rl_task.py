"""The tiny world as an RL task: prompts (a document's first 0–2 words after the separator), the reward
(validity of the whole document under the synthetic source, optionally plus its exact log-prob per token),
and the held-out measures the loop must not damage (NLL bound, length, distinct-document rate)."""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bd3_plugin.sampling.config import SamplerConfig

from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.model import BD3LM
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.likelihood.scoring import report, score_documents
from bd3_plugin.tinyworld.data import HELDOUT, read_heldout, training_docs
from bd3_plugin.tinyworld.grammar import EOS, Source
from bd3_plugin.tinyworld.validity import document_stats

PROMPT_WORDS = (0, 1, 2)  # prompt i holds the first PROMPT_WORDS[i % 3] words of its document


def prompts_from(docs: Sequence[Sequence[str]], tokenizer) -> list[list[int]]:
    """[EOS] + the first k words of document i, k cycling through PROMPT_WORDS."""
    bos = tokenizer.convert_tokens_to_ids(EOS)
    return [[bos] + tokenizer.convert_tokens_to_ids(list(d[: PROMPT_WORDS[i % len(PROMPT_WORDS)]]))
            for i, d in enumerate(docs)]


def training_prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    """Prompts from the training distribution (never the held-out documents), in a seeded order."""
    docs = training_docs(max(n, 1), seed=seed)
    random.Random(seed).shuffle(docs)
    return prompts_from(docs, tokenizer)


def heldout_prompts(tokenizer) -> list[list[int]]:
    return prompts_from([d.text.split() + [EOS] for d in read_heldout(HELDOUT)], tokenizer)


class DocumentReward:
    """1 for a finished document (prompt words + completion + EOS) in the language, else 0; with
    `logprob_weight` w, a valid document gets w · its exact log-prob per token on top."""

    def __init__(self, tokenizer, logprob_weight: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.weight = logprob_weight
        self.source = Source()

    def words(self, prompt: Sequence[int], completion: Sequence[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(prompt[1:]) + list(completion)) + [EOS]

    def viable(self, prompt: Sequence[int], tokens: Sequence[int]) -> bool:
        """Whether prompt words + tokens is a prefix of some document of the language."""
        words = self.words(prompt, tokens)[:-1]
        alive = {s for _, s in self.source.initial()}
        for word in words:
            alive = {n for s in alive for token, p, n in self.source.transitions(s) if token == word and p > 0}
            if not alive:
                return False
        return True

    def __call__(self, prompt: Sequence[int], completion: list[int], finished: bool) -> float:
        if not finished:
            return 0.0
        words = self.words(prompt, completion)
        if self.weight == 0:
            return float(self.source.is_valid(words))
        lp = self.source.log_prob(words)
        return 0.0 if lp == float("-inf") else 1.0 + self.weight * lp / len(words)


class SourceNelbo:
    """The anchor loss: the training NELBO (mean bound term per token) of a fresh batch of rows of source
    documents at every call; it keeps the model a model of the language while the reward pulls it."""

    def __init__(self, model: BD3LM, tokenizer, rows: int, seed: int, n_docs: int = 4000) -> None:
        from bd3_plugin.training.trainer import TrainConfig, rows_from_stream
        from bd3_plugin.tinyworld.data import stream_ids

        self.model = model
        self.rows = rows
        cfg = model.config
        self.noise = TrainConfig(block_size=cfg.block_size, model_length=cfg.model_length)  # training's noise
        docs = training_docs(n_docs, seed=seed + 1)  # not the prompts' documents
        self.data = rows_from_stream(stream_ids(docs, tokenizer), model.config.model_length)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self) -> torch.Tensor:
        from bd3_plugin.training.trainer import loss_fn

        x0 = self.data[torch.randint(len(self.data), (self.rows,), generator=self.gen)]  # (rows, L)
        return loss_fn(self.model, x0, self.gen, self.noise)


@dataclass(frozen=True)
class WorldEval:
    samples: int
    validity: float  # valid finished documents / samples
    finished: float  # documents that reached EOS within the token budget / samples
    mean_length: float  # tokens per document (prompt words, completion and EOS)
    distinct: float  # distinct documents / samples
    nll_bound: float  # held-out NELBO per token (fixed Monte Carlo draws: comparable across calls)


def source_reference(samples: int, seed: int = 0) -> dict:
    """The source's own mean length (tokens, EOS included) and distinct-document rate over `samples`
    documents it draws: what the model's samples should stay near."""
    rng = random.Random(seed)
    source = Source()
    docs = [tuple(source.sample(rng)) for _ in range(samples)]
    return {"mean_length": sum(map(len, docs)) / samples, "distinct": len(set(docs)) / samples}


def evaluate(model: BD3LM, tokenizer, sampler: SamplerConfig, *, samples: int, seed: int, nll_docs: int = 100,
             mc_samples: int = 2, batch: int = 128) -> WorldEval:
    """Validity etc. of `samples` documents from the held-out prompts (cycled), seeds seed, seed + 1, …
    (the same for every call, so two models are compared on common random numbers), and the NLL bound of
    the first `nll_docs` held-out documents."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    prompts = heldout_prompts(tokenizer)
    rows = [prompts[i % len(prompts)] for i in range(samples)]
    reward = DocumentReward(tokenizer)
    docs = []
    finished = []
    was_training = model.training
    model.eval()
    for start in range(0, samples, batch):
        part = rows[start : start + batch]
        out = generate(model, part, sampler, seeded_generators([seed + start + i for i in range(len(part))]),
                       eos_id=eos)
        docs += [reward.words(p, g.tokens) for p, g in zip(part, out.generations)]
        finished += [g.finish_reason == "eos" for g in out.generations]
    heldout = read_heldout(HELDOUT)[:nll_docs]
    ids = [tokenizer.convert_tokens_to_ids(d.text.split()) + [eos] for d in heldout]
    with torch.no_grad():
        per_doc = score_documents(model, ids, bos_id=eos, mc_samples=mc_samples, seed=seed, batch_size=32)
    model.train(was_training)
    nll = report(per_doc, sum(len(d) for d in ids)).nll_per_token
    stats = document_stats(reward.source, docs, finished)
    return WorldEval(samples, stats.validity, stats.finished, stats.mean_length, stats.distinct, nll)
