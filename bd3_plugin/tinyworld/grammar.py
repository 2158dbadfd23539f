"""A synthetic language whose exact probabilities are known: the tiny world's data source.

Documents are sentences of a small English-like grammar ("some old wolves follow the owl near a tree .")
with number agreement, an optional adverb and prepositional phrase, clauses joined by ", and", and an
end-of-document token. Each document has a latent topic that picks its nouns, adjectives and word
frequencies, and determiners such as "the" are shared by singular and plural noun phrases, so the
source is a probabilistic automaton with latent state: p(document) is a sum over paths, computed exactly
by the forward algorithm. A document is valid iff its probability is non-zero.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache

EOS = "<eos>"
MASK = "<mask>"
UNK = "<unk>"
SPECIALS = (UNK, EOS, MASK)  # ids 0, 1, 2

State = tuple


def _zipf(n: int, shift: int = 0) -> list[float]:
    """Zipf-like weights over n items, rotated by `shift` so that topics favour different words."""
    w = [1.0 / (1 + ((i - shift) % n)) for i in range(n)]
    z = sum(w)
    return [x / z for x in w]


@dataclass(frozen=True)
class Lexicon:
    nouns: dict[str, tuple[str, ...]]  # topic -> singular nouns (plural adds "s")
    topic_adjectives: dict[str, tuple[str, ...]]
    adjectives: tuple[str, ...]
    intransitive: tuple[tuple[str, str], ...]  # (singular, plural)
    transitive: tuple[tuple[str, str], ...]
    adverbs: tuple[str, ...]
    prepositions: tuple[str, ...]
    determiners: dict[str, dict[str, float]]  # number -> determiner -> probability

    @property
    def topics(self) -> tuple[str, ...]:
        return tuple(self.nouns)

    def words(self) -> list[str]:
        out: list[str] = []
        for topic in self.topics:
            out += [w for n in self.nouns[topic] for w in (n, n + "s")] + list(self.topic_adjectives[topic])
        out += list(self.adjectives) + [w for pair in self.intransitive + self.transitive for w in pair]
        out += list(self.adverbs) + list(self.prepositions) + [d for ds in self.determiners.values() for d in ds]
        out += [".", ",", "and"]
        return list(dict.fromkeys(out))


DEFAULT_LEXICON = Lexicon(
    nouns={"farm": ("cow", "horse", "farmer", "barn", "field", "goat"),
           "sea": ("seal", "ship", "sailor", "wave", "whale", "crab"),
           "city": ("car", "street", "baker", "tower", "bus", "driver"),
           "forest": ("wolf", "tree", "owl", "fox", "deer", "hunter")},
    topic_adjectives={"farm": ("muddy", "green"), "sea": ("salty", "blue"), "city": ("busy", "loud"),
                      "forest": ("dark", "wild")},
    adjectives=("big", "small", "old", "young", "quiet", "bright"),
    intransitive=(("sleeps", "sleep"), ("runs", "run"), ("waits", "wait"), ("sings", "sing"), ("falls", "fall")),
    transitive=(("sees", "see"), ("likes", "like"), ("follows", "follow"), ("finds", "find"),
                ("watches", "watch")),
    adverbs=("quickly", "slowly", "today", "again", "quietly"),
    prepositions=("near", "under", "behind", "with"),
    determiners={"sing": {"the": 0.5, "a": 0.35, "every": 0.15}, "plur": {"the": 0.55, "some": 0.3, "many": 0.15}},
)


@dataclass(frozen=True)
class SourceConfig:
    lexicon: Lexicon = field(default=DEFAULT_LEXICON)
    p_adj: float = 0.35  # another adjective before the noun (while fewer than max_adj)
    max_adj: int = 2
    p_transitive: float = 0.5
    p_adverb: float = 0.3
    p_pp: float = 0.25
    p_conj: float = 0.15  # ", and" instead of "."
    p_stop: float = 0.3  # end the document after a sentence
    max_sentences: int | None = None  # bound the clause count (makes the language finite)


class Source:
    """The automaton: transitions(state) -> [(token, probability, next state)], all emitting."""

    def __init__(self, config: SourceConfig = SourceConfig()) -> None:
        self.config = config
        self.lex = config.lexicon
        self.transitions = lru_cache(maxsize=None)(self._transitions)

    def initial(self) -> list[tuple[float, State]]:
        topics = self.lex.topics
        return [(1.0 / len(topics), ("S", k, True, 0)) for k in range(len(topics))]

    # ---- the grammar, one phase per state kind ------------------------------------------------
    def _transitions(self, state: State) -> list[tuple[str, float, State]]:
        kind = state[0]
        k = state[1]
        c = self.config
        if kind == "S":  # sentence start; after a full stop the document may end
            _, _, first, s = state
            stop = 0.0 if first else (1.0 if c.max_sentences and s >= c.max_sentences else c.p_stop)
            out = [(EOS, stop, ("DONE", k))] if stop else []
            return out + self._determiner(k, "subj", s, 1.0 - stop)
        if kind == "NP":
            _, _, role, number, adjs, s = state
            p_adj = c.p_adj if adjs < c.max_adj else 0.0
            topic = self.lex.topics[k]
            adjectives = self.lex.adjectives + self.lex.topic_adjectives[topic]
            out = [(a, p_adj * w, ("NP", k, role, number, adjs + 1, s))
                   for a, w in zip(adjectives, _zipf(len(adjectives), k))]
            after = {"subj": ("V", k, number, s), "obj": ("AV", k, s), "pp": ("E", k, s)}[role]
            nouns = self.lex.nouns[topic]
            suffix = "" if number == "sing" else "s"
            return out + [(n + suffix, (1 - p_adj) * w, after) for n, w in zip(nouns, _zipf(len(nouns)))]
        if kind == "V":
            _, _, number, s = state
            i = 0 if number == "sing" else 1
            out = [(v[i], (1 - c.p_transitive) * w, ("AV", k, s))
                   for v, w in zip(self.lex.intransitive, _zipf(len(self.lex.intransitive), k))]
            return out + [(v[i], c.p_transitive * w, ("OD", k, s))
                          for v, w in zip(self.lex.transitive, _zipf(len(self.lex.transitive), k))]
        if kind == "OD":
            return self._determiner(k, "obj", state[2], 1.0)
        if kind == "AV":  # optional adverb, then what may follow it
            adverbs = [(a, c.p_adverb * w, ("AP", k, state[2]))
                       for a, w in zip(self.lex.adverbs, _zipf(len(self.lex.adverbs), k))]
            return adverbs + [(t, (1 - c.p_adverb) * p, n) for t, p, n in self.transitions(("AP", k, state[2]))]
        if kind == "AP":  # optional prepositional phrase, then the end of the clause
            preps = [(p, c.p_pp / len(self.lex.prepositions), ("PD", k, state[2])) for p in self.lex.prepositions]
            return preps + [(t, (1 - c.p_pp) * p, n) for t, p, n in self.transitions(("E", k, state[2]))]
        if kind == "PD":
            return self._determiner(k, "pp", state[2], 1.0)
        if kind == "E":  # end of clause: "." or ", and"
            s = state[2] + 1
            conj = 0.0 if c.max_sentences and s >= c.max_sentences else c.p_conj
            return [(".", 1 - conj, ("S", k, False, s))] + ([(",", conj, ("C", k, s))] if conj else [])
        if kind == "C":
            return [("and", 1.0, ("S", k, True, state[2]))]
        return []  # DONE

    def _determiner(self, k: int, role: str, s: int, mass: float) -> list[tuple[str, float, State]]:
        return [(d, mass * 0.5 * p, ("NP", k, role, number, 0, s))
                for number in ("sing", "plur") for d, p in self.lex.determiners[number].items()]

    # ---- sampling and exact probabilities -----------------------------------------------------
    def sample(self, rng: random.Random) -> list[str]:
        """One document: its words, ending with EOS."""
        weights, states = zip(*self.initial())
        state = rng.choices(states, weights)[0]
        words = []
        while state[0] != "DONE":
            options = self.transitions(state)
            token, _, state = rng.choices(options, [p for _, p, _ in options])[0]
            words.append(token)
        return words

    def log_prob(self, words: list[str]) -> float:
        """Exact log p(document) by the forward algorithm (−inf for an invalid document)."""
        alpha = {}
        for p, s in self.initial():
            alpha[s] = alpha.get(s, 0.0) + p
        log_scale = 0.0
        for word in words:
            nxt: dict[State, float] = {}
            for s, a in alpha.items():
                for token, p, n in self.transitions(s):
                    if token == word and p > 0:
                        nxt[n] = nxt.get(n, 0.0) + a * p
            total = sum(nxt.values())
            if total == 0.0:
                return -math.inf
            log_scale += math.log(total)
            alpha = {s: a / total for s, a in nxt.items()}
        done = sum(a for s, a in alpha.items() if s[0] == "DONE")
        return log_scale + math.log(done) if done > 0 else -math.inf

    def is_valid(self, words: list[str]) -> bool:
        return math.isfinite(self.log_prob(words))


def corpus(n_docs: int, seed: int, source: Source | None = None) -> list[list[str]]:
    """`n_docs` documents, deterministic from the seed."""
    source = source or Source()
    rng = random.Random(seed)
    return [source.sample(rng) for _ in range(n_docs)]


def doc_text(words: list[str]) -> str:
    """The text of a document (without its EOS token)."""
    return " ".join(w for w in words if w != EOS)


def text_words(text: str) -> list[str]:
    """The inverse of doc_text, EOS appended."""
    return text.split() + [EOS]


def build_tokenizer(lexicon: Lexicon = DEFAULT_LEXICON):
    """A word-level Hugging Face fast tokenizer over the lexicon; EOS doubles as BOS, as in GPT-2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + tuple(lexicon.words()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, eos_token=EOS, bos_token=EOS,
                                   mask_token=MASK, model_max_length=1 << 30)
