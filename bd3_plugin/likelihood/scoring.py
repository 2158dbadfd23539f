"""NELBO of whole documents: rolling windows, per-document bounds, the estimator's spread.

A document longer than the model is scored in windows of model_length tokens: each window after the
first re-reads up to half a window of the preceding text as clean context and scores only its new
tokens, so the window bounds add up to a bound on the whole document. Each window's noise is seeded from
a hash of its content, so a score does not depend on batch order, batch size or what else is scored.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch

from bd3_plugin.likelihood.estimators import Estimator
from bd3_plugin.core.model import BD3LM
from bd3_plugin.likelihood.nelbo import nelbo_estimates
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.core.subs import subs_logits


@dataclass(frozen=True)
class Window:
    ids: list[int]  # at most model_length tokens
    first: int  # scored positions are [first, len(ids)); earlier ones are clean context
    doc: int  # index of the document it belongs to


@dataclass(frozen=True)
class NelboReport:
    tokens: int  # tokens scored
    nll_per_token: float  # NELBO / tokens, nats (an upper bound on the NLL)
    ppl_bound: float  # exp(nll_per_token)
    mc_samples: int  # independent estimates pooled (the Monte Carlo samples of `mc`; 1 otherwise)
    mc_stderr: float | None  # standard error of nll_per_token across them (K > 1)
    estimator: str = "mc"  # name/passes, e.g. "auto/16"

    def as_dict(self) -> dict:
        return asdict(self)


def windows(full: list[int], first: int, length: int, doc: int = 0) -> list[Window]:
    """Cover the scored positions [first, len(full)) of `full` with windows of at most `length` tokens.

    Each window keeps as much preceding text as clean context as fits, but never more than half a window
    once there is that much, so that every window scores at least half a window of new tokens.
    """
    if not 0 <= first < len(full):
        raise ValueError(f"nothing to score: scored region [{first}, {len(full)}) is empty")
    out = []
    done = first
    while done < len(full):
        end = min(len(full), done + length - min(done, length // 2))
        start = max(end - length, 0)
        out.append(Window(full[start:end], done - start, doc))
        done = end
    return out


def document_windows(ids: list[int], length: int, bos_id: int | None, doc: int = 0) -> list[Window]:
    """A document's windows. With a BOS id, it leads as unscored context; without one, the first token is
    scored with no context."""
    full = ([bos_id] if bos_id is not None else []) + list(ids)
    return windows(full, len(full) - len(ids), length, doc)


def content_seed(*parts) -> int:
    """A 63-bit seed from a hash of the parts: the same content gets the same noise in any run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def window_seed(seed: int, w: Window) -> int:
    return content_seed(seed, w.first, w.ids)


def eval_interval(block_size: int) -> tuple[float, float]:
    """t ~ U[1e-3, 1] (the evaluation protocol); with L' = 1, t ≡ 1: the same expectation (the exact
    NLL), with no variance."""
    return (1.0, 1.0) if block_size == 1 else (1e-3, 1.0)


def window_estimator(mc_samples: int | None, estimator: Estimator | None) -> Estimator:
    """The scoring functions' estimator: `estimator`, or `mc` with `mc_samples` (default 1); not both."""
    if estimator is not None:
        if mc_samples is not None:
            raise ValueError("give mc_samples or an estimator, not both")
        return estimator
    mc_samples = 1 if mc_samples is None else mc_samples
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    return Estimator("mc", mc_samples)


def columns(estimator: Estimator) -> int:
    """Estimates per window: one per Monte Carlo sample for `mc`, one otherwise."""
    return estimator.passes if estimator.name == "mc" else 1


@torch.no_grad()
def score_windows(model: BD3LM, wins: list[Window], *, mc_samples: int | None = None,
                  estimator: Estimator | None = None, seed: int = 0, seeds: list[int] | None = None,
                  batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """Bound totals (W, K) in nats for each window and Monte Carlo sample (K = 1 for planned estimators).

    Windows are batched by length. Each window's noise comes from its own seed: `seeds`, or a hash of its
    content (`window_seed`)."""
    est = window_estimator(mc_samples, estimator)
    eps_min, eps_max = eval_interval(model.config.block_size)
    seeds = [window_seed(seed, w) for w in wins] if seeds is None else seeds
    totals = torch.zeros(len(wins), columns(est), dtype=torch.float64)
    for idx, (x, valid, eligible) in _batches(wins, batch_size, model, progress, "nelbo"):
        gens = seeded_generators([seeds[i] for i in idx])
        terms = nelbo_estimates(model, x, gens, est, eligible=eligible, valid=valid, eps_min=eps_min,
                                eps_max=eps_max)  # (b, K, n)
        totals[idx] = terms.double().sum(dim=2).cpu()
    return totals


@torch.no_grad()
def greedy_windows(model: BD3LM, wins: list[Window], *, batch_size: int = 8) -> list[bool]:
    """Whether each window's scored tokens are all the model's argmax when they are all masked, every
    block seeing the clean blocks before it. With L' = 1 this is exactly greedy AR decoding."""
    out = [False] * len(wins)
    mask_id = model.config.mask_id
    for idx, (x, valid, eligible) in _batches(wins, batch_size, model, False, ""):
        x_t = torch.where(eligible, torch.full_like(x, mask_id), x)
        logits = subs_logits(model.forward_train(x_t, x, valid), mask_id, torch.float32)
        hit = (logits.argmax(-1) == x) | ~eligible
        for r, i in enumerate(idx):
            out[i] = bool(hit[r].all())
    return out


PAD_QUANTUM = 16  # tokens: windows are computed at a multiple of this


def padded_length(n: int, max_length: int) -> int:
    """The length a window of n tokens is computed at: n rounded up to a multiple of PAD_QUANTUM, at most
    max_length.

    A row's float32 result depends on the shape of the tensors it is computed in (the matmul and attention
    kernels sum in an order set by the sequence length), so padding each window to the batch's longest
    moved a score by ~1e-6 with the other windows of its batch. A length set by the window alone makes its
    score the same in any batch, of any size, for at most PAD_QUANTUM - 1 padded positions per window (a
    power of two would cost up to twice the work: 65 tokens at 128); windows of one padded length share
    batches, so there are at most max_length / PAD_QUANTUM kinds of batch."""
    return min(-(-n // PAD_QUANTUM) * PAD_QUANTUM, max_length)


def _groups(wins: list[Window], batch_size: int, max_length: int) -> list[list[int]]:
    """Window indices in batches of one padded length, longest first."""
    padded = [padded_length(len(w.ids), max_length) for w in wins]
    order = sorted(range(len(wins)), key=lambda i: (-padded[i], -len(wins[i].ids)))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < batch_size and padded[groups[-1][0]] == padded[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _batches(wins: list[Window], batch_size: int, model: BD3LM, progress: bool, desc: str):
    """Windows in batches of one padded length (`padded_length`): (indices, ids, valid, eligible) each."""
    max_length = model.config.model_length
    groups = _groups(wins, batch_size, max_length)
    if progress:
        from tqdm import tqdm

        groups = tqdm(groups, desc=desc, unit="batch")
    for idx in groups:
        n = padded_length(len(wins[idx[0]].ids), max_length)
        x = torch.zeros(len(idx), n, dtype=torch.long)
        valid = torch.zeros(len(idx), n, dtype=torch.bool)
        eligible = torch.zeros_like(valid)
        for r, i in enumerate(idx):
            w = wins[i]
            x[r, : len(w.ids)] = torch.tensor(w.ids)
            valid[r, : len(w.ids)] = True
            eligible[r, w.first : len(w.ids)] = True
        yield idx, (x.to(model.device), valid.to(model.device), eligible.to(model.device))


def score_documents(model: BD3LM, docs: list[list[int]], *, bos_id: int | None, mc_samples: int | None = None,
                    estimator: Estimator | None = None, seed: int = 0, batch_size: int = 8,
                    progress: bool = False) -> torch.Tensor:
    """Per-document bound totals (D, K) in nats, one column per Monte Carlo sample (K = 1 for planned
    estimators)."""
    if not docs or any(len(d) == 0 for d in docs):
        raise ValueError("nothing to score: a document has no tokens")
    est = window_estimator(mc_samples, estimator)
    wins = [w for i, d in enumerate(docs) for w in document_windows(d, model.config.model_length, bos_id, i)]
    per_window = score_windows(model, wins, estimator=est, seed=seed, batch_size=batch_size, progress=progress)
    per_doc = torch.zeros(len(docs), columns(est), dtype=torch.float64)
    per_doc.index_add_(0, torch.tensor([w.doc for w in wins]), per_window)
    return per_doc


def report(per_doc: torch.Tensor, tokens: int, estimator: Estimator | None = None) -> NelboReport:
    """Pool per-document totals (D, K) into a bound per token."""
    per_sample = per_doc.sum(dim=0) / tokens  # (K,)
    k = per_sample.numel()
    nll = float(per_sample.mean())
    stderr = float(per_sample.std() / math.sqrt(k)) if k > 1 else None
    name = str(estimator) if estimator is not None else f"mc/{k}"
    return NelboReport(tokens, nll, math.exp(nll), k, stderr, name)
