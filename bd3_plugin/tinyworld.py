"""The tiny world: the synthetic language's data sets and the checkpoints trained on it, shipped with the
package so that everything runs the moment it is installed."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .synthetic import EOS, Source, corpus, doc_text

PACKAGE_DIR = Path(__file__).parent
CHECKPOINTS = PACKAGE_DIR / "checkpoints"
HELDOUT = PACKAGE_DIR / "data" / "synthetic_heldout.jsonl"
TRAIN_SEED, HELDOUT_SEED = 1000, 7  # disjoint seeds: held-out documents are drawn independently
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


def true_perplexity(docs: list[HeldoutDoc]) -> float:
    return math.exp(true_nll_per_token(docs))
