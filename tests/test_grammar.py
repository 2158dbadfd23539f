import math
import random

import pytest

from bd3_plugin.tinyworld.grammar import (EOS, Lexicon, Source, SourceConfig, build_tokenizer, corpus, doc_text,
    text_words)

SMALL = SourceConfig(
    lexicon=Lexicon(nouns={"a": ("cow",), "b": ("ship",)}, topic_adjectives={"a": ("green",), "b": ("blue",)},
                    adjectives=("old",), intransitive=(("sleeps", "sleep"),), transitive=(("sees", "see"),),
                    adverbs=("today",), prepositions=("near",),
                    determiners={"sing": {"the": 0.6, "a": 0.4}, "plur": {"the": 1.0}}),
    max_adj=1, max_sentences=1, p_conj=0.0)


def enumerate_language(source: Source) -> dict[tuple[str, ...], float]:
    """Every document of a finite language with its probability, by walking every path."""
    out: dict[tuple[str, ...], float] = {}
    stack = [(p, s, ()) for p, s in source.initial()]
    while stack:
        p, state, words = stack.pop()
        if state[0] == "DONE":
            out[words] = out.get(words, 0.0) + p
            continue
        for token, q, nxt in source.transitions(state):
            if q > 0:
                stack.append((p * q, nxt, words + (token,)))
    return out


def brute_force_prob(source: Source, words: list[str]) -> float:
    """Sum over every latent path that emits exactly these words."""
    def walk(state, i):
        if i == len(words):
            return 1.0 if state[0] == "DONE" else 0.0
        return sum(p * walk(n, i + 1) for t, p, n in source.transitions(state) if t == words[i])
    return sum(p * walk(s, 0) for p, s in source.initial())


def test_probabilities_sum_to_one_on_a_finite_language():
    source = Source(SMALL)
    language = enumerate_language(source)
    assert len(language) > 100
    assert math.isclose(sum(language.values()), 1.0, rel_tol=1e-12)
    for words, p in list(language.items())[:200]:
        assert math.isclose(source.log_prob(list(words)), math.log(p), rel_tol=1e-9)


def test_every_state_is_a_distribution():
    source = Source()
    seen = set()
    for words in corpus(200, 3, source):  # the states a sample visits
        frontier = [s for _, s in source.initial()]
        for _ in words:
            for s in frontier:
                if s not in seen and s[0] != "DONE":
                    seen.add(s)
                    assert math.isclose(sum(p for _, p, _ in source.transitions(s)), 1.0, rel_tol=1e-12), s
            frontier = list({n for s in frontier for _, _, n in source.transitions(s)})[:50]


def test_forward_algorithm_matches_brute_force():
    source = Source()
    for words in corpus(30, 11, source):
        if len(words) <= 25:
            assert math.isclose(source.log_prob(words), math.log(brute_force_prob(source, words)), rel_tol=1e-9)


def test_same_seed_same_corpus_and_validity():
    a, b, c = corpus(50, 5), corpus(50, 5), corpus(50, 6)
    assert a == b and a != c
    source = Source()
    assert all(source.is_valid(d) and d[-1] == EOS and EOS not in d[:-1] for d in a)
    good = text_words("the old cows sleep near a field .")
    assert source.is_valid(good)
    assert not source.is_valid(text_words("the old cows sleeps near a field ."))  # agreement
    assert not source.is_valid(text_words("the cow sees a whale ."))  # two topics in one document
    assert not source.is_valid(good[:-2] + [EOS])  # no full stop


def test_tokenizer_round_trip():
    tok = build_tokenizer()
    words = corpus(1, 2)[0]
    ids = tok.convert_tokens_to_ids(words)
    assert tok.unk_token_id not in ids
    assert tok.encode(doc_text(words), add_special_tokens=False) == ids[:-1]
    assert tok.decode(ids[:-1]) == doc_text(words)
    assert (tok.eos_token_id, tok.bos_token_id, tok.mask_token_id) == (1, 1, 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_sampling_frequencies_follow_the_automaton(seed):
    """The first word's frequency matches its exact marginal probability."""
    source = Source()
    rng = random.Random(seed)
    n = 4000
    firsts = [source.sample(rng)[0] for _ in range(n)]
    p_the = 0.5 * 0.5 + 0.5 * 0.55
    assert abs(firsts.count("the") / n - p_the) < 4 * math.sqrt(p_the * (1 - p_the) / n)
