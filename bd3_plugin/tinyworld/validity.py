"""How the tiny world judges a set of sampled documents: the one validity statistic of `bd3 world`, the RL
loop's rollouts and its held-out checks."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bd3_plugin.tinyworld.grammar import Source


@dataclass(frozen=True)
class DocumentStats:
    validity: float  # finished documents that the source can produce / documents
    finished: float  # documents that reached EOS within the token budget / documents
    mean_length: float  # words per document (EOS included)
    distinct: float  # distinct documents / documents


def document_stats(source: Source, docs: Sequence[Sequence[str]], finished: Sequence[bool]) -> DocumentStats:
    """`docs` as words (EOS included), `finished[i]` whether document i reached EOS. An unfinished document is
    never valid, whatever its words."""
    if len(docs) != len(finished) or not docs:
        raise ValueError(f"need one finished flag per document and at least one, got {len(docs)} and {len(finished)}")
    n = len(docs)
    valid = sum(bool(done) and source.is_valid(list(words)) for words, done in zip(docs, finished))
    return DocumentStats(valid / n, sum(map(bool, finished)) / n, sum(map(len, docs)) / n,
                         len({tuple(words) for words in docs}) / n)
