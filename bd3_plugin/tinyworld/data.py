"""The tiny world: the synthetic language's data sets and the checkpoints trained on it, shipped with the
package so that everything runs the moment it is installed."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bd3_plugin.tinyworld.grammar import EOS, Source, corpus, doc_text

PACKAGE_DIR = Path(__file__).parent.parent  # bd3_plugin/
CHECKPOINTS = PACKAGE_DIR / "checkpoints"
HELDOUT = PACKAGE_DIR / "data" / "synthetic_heldout.jsonl"
TRAIN_SEED = 1000  # disjoint seeds: held-out documents are drawn independently
HELDOUT_SEED = 7
BLOCK_SIZES = (1, 4, 16, 128)  # 128 = model_length: the MDLM-like checkpoint
DEFAULT_BLOCK_SIZE = 4


def checkpoint_path(block_size: int = DEFAULT_BLOCK_SIZE) -> Path:
    return CHECKPOINTS / f"tiny-bd3-L{block_size}"


def bundled_checkpoints() -> list[Path]:
    return [checkpoint_path(b) for b in BLOCK_SIZES if (checkpoint_path(b) / "config.json").is_file()]


def stream_ids(docs: list[list[str]], tokenizer) -> list[int]:
    """[EOS] doc₁ [EOS] doc₂ [EOS] …: documents as the training rows and the held-out scoring see them."""
    ids = [tokenizer.convert_tokens_to_ids(EOS)]
    for words in docs:
        ids += tokenizer.convert_tokens_to_ids(words)
    return ids


def training_docs(n_docs: int, seed: int = TRAIN_SEED) -> list[list[str]]:
    return corpus(n_docs, seed)


@dataclass(frozen=True)
class HeldoutDoc:
    text: str  # without EOS
    tokens: int  # with EOS
    logprob: float  # exact log p(document), EOS included


def write_heldout(path: Path, n_docs: int, seed: int = HELDOUT_SEED) -> None:
    source = Source()
    lines = []
    for words in corpus(n_docs, seed, source):
        lines.append(json.dumps({"text": doc_text(words), "tokens": len(words), "logprob": source.log_prob(words)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def read_heldout(path: Path = HELDOUT) -> list[HeldoutDoc]:
    return [HeldoutDoc(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def true_nll_per_token(docs: list[HeldoutDoc]) -> float:
    """The source's exact NLL per token on these documents: what no model's bound can beat on average."""
    return -sum(d.logprob for d in docs) / sum(d.tokens for d in docs)


MC_SEED = 11


def mc_pairs(n_items: int = 200, seed: int = MC_SEED, margin: float = 3.0) -> list[dict]:
    """Multiple-choice items: two documents of the same length; the answer is the more probable one
    (by at least `margin` nats). Equal lengths keep the choice about probability, not length."""
    import random

    source = Source()
    rng = random.Random(seed)
    by_len: dict[int, list[tuple[list[str], float]]] = {}
    items = []
    while len(items) < n_items:
        words = source.sample(rng)
        lp = source.log_prob(words)
        for other, other_lp in by_len.get(len(words), []):
            if abs(lp - other_lp) >= margin and other != words:
                by_len[len(words)].remove((other, other_lp))
                pair = [(words, lp), (other, other_lp)]
                rng.shuffle(pair)
                items.append({"choices": [doc_text(w) for w, _ in pair],
                              "logprobs": [p for _, p in pair], "label": int(pair[1][1] > pair[0][1])})
                break
        else:
            by_len.setdefault(len(words), []).append((words, lp))
    return items


def generation_prompts(n_items: int = 100, prompt_words: int = 3) -> list[dict]:
    """The first words of held-out documents, to be continued into a whole valid document."""
    out = []
    for d in read_heldout(HELDOUT):
        words = d.text.split()
        if len(words) > prompt_words + 2:
            out.append({"prompt": " ".join(words[:prompt_words]), "reference": d.text})
        if len(out) == n_items:
            break
    return out


# ---- the copy task ------------------------------------------------------------------------------------
COPY_HELDOUT = PACKAGE_DIR / "data" / "copy_heldout.jsonl"
COPY_HELDOUT_SEED = 17
COPY_BLOCK_SIZES = (4, 16)


def copy_checkpoint_path(block_size: int) -> Path:
    return CHECKPOINTS / f"tiny-bd3-copy-L{block_size}"


def bundled_copy_checkpoints() -> list[Path]:
    return [copy_checkpoint_path(b) for b in COPY_BLOCK_SIZES if (copy_checkpoint_path(b) / "config.json").is_file()]


def copy_stream_ids(docs: list[list[str]], tokenizer) -> list[int]:
    """[EOS] doc₁ [EOS] doc₂ …, each document with its own leading EOS: a document then fills a whole
    unit of doc_tokens + 1 positions, so rows of a multiple of that length hold documents exactly where
    generation puts them (the prompt from position 0, the answer ending on a block boundary)."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for words in docs:
        ids += [eos] + tokenizer.convert_tokens_to_ids(words)
    return ids


def training_stream(source: str, n_docs: int, tokenizer) -> list[int]:
    """The token stream that `bd3 train --data synthetic --source SOURCE` wraps into rows."""
    from bd3_plugin.tinyworld.copying import copy_corpus

    if source == "grammar":
        return stream_ids(training_docs(n_docs), tokenizer)
    if source == "copy":
        return copy_stream_ids(copy_corpus(n_docs, TRAIN_SEED), tokenizer)
    raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")


SOURCES = ("grammar", "copy")


@dataclass(frozen=True)
class CopyItem:
    prompt: str  # the list and the separator
    answer: str  # the copy, without EOS
    logprob: float  # exact log p(prompt + answer + EOS)


def write_copy_heldout(path: Path, n_items: int, seed: int = COPY_HELDOUT_SEED) -> None:
    from bd3_plugin.tinyworld.copying import CopySource, copy_corpus

    source = CopySource()
    lines = []
    for doc in copy_corpus(n_items, seed, source):
        prompt, answer = source.split(doc)
        lines.append(json.dumps({"prompt": " ".join(prompt), "answer": doc_text(answer),
                                 "logprob": source.log_prob(doc)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def read_copy_heldout(path: Path = COPY_HELDOUT) -> list[CopyItem]:
    return [CopyItem(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
