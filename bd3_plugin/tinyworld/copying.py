"""The copy task: a low-entropy source in which the prompt fully determines a long answer.

A document is a list of `n_words` words drawn uniformly and independently from an alphabet (the grammar's
words, so both sources share one tokenizer), a separator, the same list again, and EOS:

    wolf today the cows . and wolf today the cows <eos>        (n_words = 4)

The prompt is the list and the separator; the answer is the copy and EOS. Every answer token is a
function of the prompt, so the answer's entropy is exactly 0 nats per token and the answer is correct iff
it equals the copy. With the defaults (30 words, a two-token separator) a document after its leading EOS
is 64 tokens: the answer ends at position 63, the end of a block for every L' dividing 64, so a
block-diffusion sampler decoding from position 0 finishes the answer without decoding past it. The copy
sits 32 positions after its source, in an earlier block at every L' ≤ 32, so every answer token can be
read off clean context in the same pass: long stretches of near-certain tokens for parallel decoding.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from bd3_plugin.tinyworld.grammar import DEFAULT_LEXICON, EOS

SEPARATOR = (".", "and")


def _default_alphabet() -> tuple[str, ...]:
    return tuple(w for w in DEFAULT_LEXICON.words() if w not in SEPARATOR + (",",))


@dataclass(frozen=True)
class CopyConfig:
    n_words: int = 30
    separator: tuple[str, ...] = SEPARATOR
    alphabet: tuple[str, ...] = field(default_factory=_default_alphabet)

    def __post_init__(self) -> None:
        if not isinstance(self.n_words, int) or self.n_words < 1:
            raise ValueError(f"n_words must be a positive integer, got {self.n_words!r}")
        if not self.separator:
            raise ValueError("separator must hold at least one token")
        if len(set(self.alphabet)) != len(self.alphabet) or len(self.alphabet) < 2:
            raise ValueError(f"alphabet must hold at least two distinct words, got {len(self.alphabet)}")
        clash = set(self.alphabet) & (set(self.separator) | {EOS})
        if clash:
            raise ValueError(f"alphabet words {sorted(clash)} collide with the separator or EOS")

    @property
    def prompt_tokens(self) -> int:
        return self.n_words + len(self.separator)

    @property
    def answer_tokens(self) -> int:
        return self.n_words + 1  # the copy and EOS

    @property
    def doc_tokens(self) -> int:
        return self.prompt_tokens + self.answer_tokens


class CopySource:
    """Exact probabilities of the copy task: p(doc) = |alphabet|^(−n_words) for a well-formed document."""

    def __init__(self, config: CopyConfig = CopyConfig()) -> None:
        self.config = config
        self._alphabet = frozenset(config.alphabet)

    def sample(self, rng: random.Random) -> list[str]:
        """One document: prompt then answer, ending with EOS."""
        words = [rng.choice(self.config.alphabet) for _ in range(self.config.n_words)]
        return self.prompt(words) + self.answer(words)

    def prompt(self, words: list[str]) -> list[str]:
        return list(words) + list(self.config.separator)

    def answer(self, words: list[str]) -> list[str]:
        return list(words) + [EOS]

    def split(self, doc: list[str]) -> tuple[list[str], list[str]]:
        n = self.config.prompt_tokens
        return doc[:n], doc[n:]

    def next_token(self, prefix: list[str]) -> dict[str, float]:
        """The source's exact distribution of the next token after `prefix` ({} if the prefix is impossible
        or complete): uniform over the alphabet in the list, a point mass in the separator and the answer."""
        c = self.config
        i = len(prefix)
        if i >= c.doc_tokens or not self._possible(prefix):
            return {}
        if i < c.n_words:
            return {w: 1.0 / len(c.alphabet) for w in c.alphabet}
        if i < c.prompt_tokens:
            return {c.separator[i - c.n_words]: 1.0}
        j = i - c.prompt_tokens  # answer position
        return {prefix[j] if j < c.n_words else EOS: 1.0}

    def _possible(self, prefix: list[str]) -> bool:
        c = self.config
        head = prefix[: c.n_words]
        if any(w not in self._alphabet for w in head):
            return False
        full = self.prompt(head) + self.answer(head)
        return len(prefix) <= c.doc_tokens and prefix == full[: len(prefix)]

    def log_prob(self, doc: list[str]) -> float:
        """Exact log p(document), EOS included (−inf for a document the source cannot produce)."""
        total = 0.0
        for i, token in enumerate(doc):
            p = self.next_token(doc[:i]).get(token, 0.0)
            if p == 0.0:
                return -math.inf
            total += math.log(p)
        return total if len(doc) == self.config.doc_tokens else -math.inf

    def is_correct(self, prompt: list[str], answer: list[str]) -> bool:
        """Exact correctness: `answer` (EOS included) is the one answer the source gives after `prompt`."""
        return math.isfinite(self.log_prob(list(prompt) + list(answer))) and len(prompt) == self.config.prompt_tokens

    def answer_entropy(self, prompt: list[str]) -> float:
        """Exact entropy of the answer given the prompt, in nats per answer token:
        E[Σᵢ H(aᵢ | prompt, a<ᵢ)] / answer length, summed over every answer the source can give."""
        if len(prompt) != self.config.prompt_tokens:
            raise ValueError(f"a prompt has {self.config.prompt_tokens} tokens, got {len(prompt)}")
        total = 0.0
        stack = [(1.0, list(prompt))]
        while stack:
            p_path, doc = stack.pop()
            if len(doc) == self.config.doc_tokens:
                continue
            dist = self.next_token(doc)
            if not dist:
                raise ValueError(f"{' '.join(prompt)!r} is not a prompt of the copy task")
            total -= p_path * sum(p * math.log(p) for p in dist.values() if p > 0)
            stack += [(p_path * p, doc + [token]) for token, p in dist.items() if p > 0]
        return total / self.config.answer_tokens

    def doc_entropy_per_token(self) -> float:
        """Exact entropy of a whole document per token (EOS included): the list carries all of it."""
        c = self.config
        return c.n_words * math.log(len(c.alphabet)) / c.doc_tokens


def copy_corpus(n_docs: int, seed: int, source: CopySource | None = None) -> list[list[str]]:
    """`n_docs` documents, deterministic from the seed."""
    source = source or CopySource()
    rng = random.Random(seed)
    return [source.sample(rng) for _ in range(n_docs)]
