"""Exact per-token log-probabilities of a stream of the synthetic language: `<eos> doc₁ <eos> doc₂ …`.

A sample generated through EOS holds several documents and usually ends inside one, so the source scores it
token by token: each token's probability given the document so far (the forward algorithm, one step per
token), and a new document starts after every `<eos>`. The first token is the leading `<eos>` the sample
starts from: context, not scored.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from bd3_plugin.tinyworld.grammar import EOS, Source


def stream_logprobs(source: Source, words: Sequence[str]) -> list[float | None]:
    """log p(words[i] | the document so far) for i ≥ 1. A word the source cannot emit there gets −inf; the
    rest of that document, its `<eos>` included, has no defined probability (None), and the document
    after it is scored afresh."""
    if not words or words[0] != EOS:
        raise ValueError(f"a stream starts with {EOS!r}, got {list(words[:1])!r}")
    out: list[float | None] = []
    alpha: dict | None = _initial(source)
    for word in words[1:]:
        if alpha is None:  # inside a document that already went wrong
            out.append(None)
        else:
            nxt: dict = {}
            for state, a in alpha.items():
                for token, p, n in source.transitions(state):
                    if token == word and p > 0:
                        nxt[n] = nxt.get(n, 0.0) + a * p
            total = sum(nxt.values())
            out.append(math.log(total) if total > 0 else -math.inf)
            alpha = {s: a / total for s, a in nxt.items()} if total > 0 else None
        if word == EOS:  # every path is done; the next word opens a new document
            alpha = _initial(source)
    return out


def document_validity(words: Sequence[str], logprobs: Sequence[float | None]) -> tuple[int, int]:
    """(valid, complete) documents of a scored stream: those that end in `<eos>` inside it."""
    valid = 0
    complete = 0
    ok = True
    for word, lp in zip(words[1:], logprobs):
        ok &= lp is not None and math.isfinite(lp)
        if word == EOS:
            complete += 1
            valid += ok
            ok = True
    return valid, complete


def _initial(source: Source) -> dict:
    alpha: dict = {}
    for p, s in source.initial():
        alpha[s] = alpha.get(s, 0.0) + p
    return alpha
