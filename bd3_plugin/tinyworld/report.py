"""The tiny world's report: held-out NELBO per block size next to the source's exact entropy, and the
fraction of sampled documents that are valid sentences of the synthetic language; for the copy task,
the bound next to the exact NLL, and exact correctness and tokens per denoising pass per sampler."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.sampling.config import ALGORITHMS, SamplerConfig
from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.likelihood.scoring import report, score_documents
from bd3_plugin.tinyworld.copy_eval import CopyScore, solve
from bd3_plugin.tinyworld.copying import CopySource
from bd3_plugin.tinyworld.grammar import EOS, Source
from bd3_plugin.tinyworld.validity import document_stats
from bd3_plugin.tinyworld.data import (COPY_HELDOUT, HELDOUT, bundled_checkpoints, bundled_copy_checkpoints,
    read_copy_heldout, read_heldout, true_nll_per_token)


@dataclass(frozen=True)
class WorldRow:
    checkpoint: str
    block_size: int
    nll_bound: float
    mc_stderr: float | None
    ppl_bound: float
    true_nll: float
    true_ppl: float
    valid: dict[str, float]  # sampler -> fraction of valid documents
    finished: dict[str, float]  # sampler -> fraction that reached EOS within the token budget


def sample_validity(ckpt, algorithm: str, n: int, seed: int, max_new_tokens: int = 128) -> tuple[float, float]:
    """Documents sampled after a lone EOS (the document separator): (valid fraction, finished fraction)."""
    source = Source()
    bos = ckpt.tokenizer.bos_token_id
    cfg = SamplerConfig(algorithm=algorithm, max_new_tokens=max_new_tokens)
    out = generate(ckpt.model, [[bos]] * n, cfg, seeded_generators([seed + i for i in range(n)]), eos_id=ckpt.eos_id)
    docs = [ckpt.tokenizer.convert_ids_to_tokens(g.tokens) + [EOS] for g in out.generations]
    stats = document_stats(source, docs, [g.finish_reason == "eos" for g in out.generations])
    return stats.validity, stats.finished


def world_rows(paths: list[Path] | None = None, *, mc_samples: int = 4, n_samples: int = 64, seed: int = 0,
               heldout_docs: int | None = None, progress: bool = False) -> list[WorldRow]:
    heldout = read_heldout(HELDOUT)[:heldout_docs]
    truth = true_nll_per_token(heldout)
    rows = []
    for path in paths or bundled_checkpoints():
        ckpt = load_checkpoint(path)
        docs = [ckpt.encode(d.text) + [ckpt.eos_id] for d in heldout]
        rep = report(score_documents(ckpt.model, docs, bos_id=ckpt.tokenizer.bos_token_id, mc_samples=mc_samples,
                                     seed=seed, batch_size=32, progress=progress), sum(len(d) for d in docs))
        valid = {}
        finished = {}
        for algorithm in ALGORITHMS:
            valid[algorithm], finished[algorithm] = sample_validity(ckpt, algorithm, n_samples, seed)
        rows.append(WorldRow(Path(path).name, ckpt.config.block_size, rep.nll_per_token, rep.mc_stderr,
                             rep.ppl_bound, truth, math.exp(truth), valid, finished))
    return rows


def markdown(rows: list[WorldRow], mc_samples: int, n_samples: int, n_docs: int) -> str:
    lines = [f"Held-out: {n_docs} documents; bound = NELBO with t ~ U[1e-3, 1] ({mc_samples} Monte Carlo "
             f"samples, ± one standard error; L' = 1 uses t ≡ 1, exact); validity over {n_samples} sampled "
             f"documents per sampler.", "",
             "| checkpoint | L' | NLL bound (nats/token) | perplexity bound | true NLL | true perplexity | "
             + " | ".join(f"valid ({a})" for a in ALGORITHMS) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(ALGORITHMS)]
    for r in rows:
        err = " (exact)" if r.block_size == 1 or r.mc_stderr is None else f" ± {r.mc_stderr:.3f}"
        lines.append(f"| {r.checkpoint} | {r.block_size} | {r.nll_bound:.3f}{err} | {r.ppl_bound:.2f} | "
                     f"{r.true_nll:.3f} | {r.true_ppl:.2f} | "
                     + " | ".join(f"{r.valid[a]:.0%}" for a in ALGORITHMS) + " |")
    return "\n".join(lines)


def as_dicts(rows: list[WorldRow]) -> list[dict]:
    return [asdict(r) for r in rows]


# ---- the copy task ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CopyRow:
    checkpoint: str
    block_size: int
    nll_bound: float  # NELBO per token of the held-out documents (prompt, answer and EOS)
    mc_stderr: float | None
    true_nll: float  # the source's exact NLL per token of the same documents
    scores: dict[str, CopyScore]  # sampler -> exact correctness and tokens per pass at temperature 0


def copy_rows(paths: list[Path] | None = None, *, threshold: float = 0.9, mc_samples: int = 4, seed: int = 0,
              n_items: int | None = None) -> list[CopyRow]:
    items = read_copy_heldout(COPY_HELDOUT)[:n_items]
    truth = -sum(i.logprob for i in items) / (len(items) * CopySource().config.doc_tokens)
    rows = []
    for path in paths or bundled_copy_checkpoints():
        ckpt = load_checkpoint(path)
        docs = [ckpt.encode(f"{i.prompt} {i.answer}") + [ckpt.eos_id] for i in items]
        rep = report(score_documents(ckpt.model, docs, bos_id=ckpt.tokenizer.bos_token_id, mc_samples=mc_samples,
                                     seed=seed, batch_size=32), sum(len(d) for d in docs))
        scores = {a: solve(ckpt, items, SamplerConfig(algorithm=a, temperature=0.0, threshold=threshold), seed)
                  for a in ALGORITHMS}
        rows.append(CopyRow(Path(path).name, ckpt.config.block_size, rep.nll_per_token, rep.mc_stderr, truth,
                            scores))
    return rows


def heldout_answer_entropy(n_items: int | None = None) -> float:
    """The source's exact answer entropy (nats per answer token), averaged over the held-out prompts."""
    source = CopySource()
    items = read_copy_heldout(COPY_HELDOUT)[:n_items]
    return sum(source.answer_entropy(i.prompt.split()) for i in items) / len(items)


def copy_markdown(rows: list[CopyRow], threshold: float, mc_samples: int, answer_entropy: float) -> str:
    source = CopySource()
    items = rows[0].scores[ALGORITHMS[0]].items if rows else 0
    lines = [f"Copy task: {items} held-out items; exact answer entropy {answer_entropy:.3f} "
             f"nats/answer token, document entropy {source.doc_entropy_per_token():.3f} nats/token; bound = NELBO "
             f"({mc_samples} Monte Carlo samples); answers at temperature 0 (threshold {threshold}), correct = "
             "equal to the copy; tokens/pass = answer tokens per denoising pass of a request.", "",
             "| checkpoint | L' | NLL bound (nats/token) | true NLL | "
             + " | ".join(f"correct ({a})" for a in ALGORITHMS) + " | "
             + " | ".join(f"tokens/pass ({a})" for a in ALGORITHMS) + " |",
             "|---|---:|---:|---:|" + "---:|" * 2 * len(ALGORITHMS)]
    for r in rows:
        err = f" ± {r.mc_stderr:.3f}" if r.mc_stderr is not None else ""
        lines.append(f"| {r.checkpoint} | {r.block_size} | {r.nll_bound:.3f}{err} | {r.true_nll:.3f} | "
                     + " | ".join(f"{r.scores[a].correct:.1%}" for a in ALGORITHMS) + " | "
                     + " | ".join(f"{r.scores[a].tokens_per_pass:.2f}" for a in ALGORITHMS) + " |")
    return "\n".join(lines)


def copy_dicts(rows: list[CopyRow]) -> list[dict]:
    return [asdict(r) | {"scores": {a: asdict(s) | {"tokens_per_pass": s.tokens_per_pass}
                                    for a, s in r.scores.items()}} for r in rows]
