"""The paper's zero-shot perplexity protocol: a corpus cut into model-length rows, each scored alone.

The reference tokenises every document of a split on its own (no special tokens), concatenates the token
lists without separators, and cuts the stream into rows of model_length − 2 tokens, each framed as
`[BOS] + tokens + [EOS]`; the remainder that does not fill a row is dropped. Each row is scored without any
earlier context: token 0 (the BOS) is context, the other model_length − 1 tokens are scored, the row's
artificial EOS included. The perplexity is per model token, pooled over the corpus.

A corpus reaches the model through lm-eval as one `loglikelihood_rolling` request whose text holds its
documents joined by RECORD_SEPARATOR, so that each document is still tokenised on its own. The
`documents` protocol instead scores each record (or a plain request) as a document in rolling windows
after an end-of-text token, every token of it scored.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from bd3_plugin.likelihood.scoring import Window, document_windows

RECORD_SEPARATOR = "\x1e"  # ASCII "record separator": never part of the corpora's text
PROTOCOLS = ("auto", "rows", "documents")


class ScoredLoglikelihood(float):
    """A rolling log-likelihood (bound) that also carries how many model tokens it covers, so that a
    task can report a per-token perplexity beside lm-eval's per-word and per-byte ones."""

    def __new__(cls, value: float, tokens: int):
        obj = super().__new__(cls, value)
        obj.tokens = int(tokens)
        return obj

    def __reduce__(self):  # lm-eval's cache pickles results
        return (ScoredLoglikelihood, (float(self), self.tokens))


def join_records(records: Sequence[str]) -> str:
    """One request text for a corpus: its documents joined by RECORD_SEPARATOR."""
    bad = [i for i, r in enumerate(records) if RECORD_SEPARATOR in r]
    if bad:
        raise ValueError(f"document {bad[0]} contains the record separator {RECORD_SEPARATOR!r}")
    return RECORD_SEPARATOR.join(records)


def split_records(text: str) -> list[str]:
    return text.split(RECORD_SEPARATOR)


def resolve_protocol(protocol: str, text: str) -> str:
    """`auto`: a corpus request (one holding RECORD_SEPARATOR) gets `rows`, any other `documents`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "auto":
        return "rows" if RECORD_SEPARATOR in text else "documents"
    return protocol


def corpus_rows(docs: Sequence[Sequence[int]], length: int, bos_id: int, eos_id: int) -> list[list[int]]:
    """Rows of `length` tokens, `[bos] + length − 2 corpus tokens + [eos]`, from the documents' token
    lists concatenated without separators; a remainder shorter than a row is dropped."""
    if length < 3:
        raise ValueError(f"a row needs room for BOS, one token and EOS: length must be >= 3, got {length}")
    stream = [t for doc in docs for t in doc]
    body = length - 2
    return [[bos_id] + stream[i : i + body] + [eos_id] for i in range(0, len(stream) - body + 1, body)]


def row_windows(rows: Sequence[Sequence[int]], doc: int) -> list[Window]:
    """Each row is its own window; position 0 (the BOS) is clean context and unscored."""
    return [Window(list(r), 1, doc) for r in rows]


def rolling_windows(text: str, protocol: str, encode: Callable[[str], list[int]], length: int, bos_id: int,
                    eos_id: int, doc: int = 0) -> tuple[list[Window], int]:
    """The windows that score one `loglikelihood_rolling` request, and the number of tokens they score."""
    records = split_records(text)
    if resolve_protocol(protocol, text) == "rows":
        rows = corpus_rows([encode(r) for r in records], length, bos_id, eos_id)
        if not rows:
            n = sum(len(encode(r)) for r in records)
            raise ValueError(f"protocol rows: the corpus has {n} tokens, fewer than one row of {length - 2} "
                             f"(model_length {length} minus BOS and EOS)")
        return row_windows(rows, doc), len(rows) * (length - 1)
    ids = [t for t in (encode(r) for r in records) if t]
    if not ids:
        raise ValueError(f"nothing to score: the document {text[:40]!r} has no tokens")
    # A document follows an end-of-text token, as in the training streams `[EOS] doc [EOS] …`.
    wins = [w for t in ids for w in document_windows(t, length, eos_id, doc)]
    return wins, sum(len(t) for t in ids)
