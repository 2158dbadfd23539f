"""The bundled tiny world: its checkpoints load and behave as the synthetic language demands."""
import math

import pytest

from bd3_plugin.checkpoint import load_checkpoint
import torch

from bd3_plugin.scoring import score_documents
from bd3_plugin.tinyworld.grammar import Source, text_words
from bd3_plugin.tinyworld.data import BLOCK_SIZES, HELDOUT, bundled_checkpoints, checkpoint_path, read_heldout
from bd3_plugin.tinyworld.report import sample_validity

HELDOUT_DOCS = read_heldout(HELDOUT)


def test_every_block_size_is_bundled_and_small():
    assert [p.name for p in bundled_checkpoints()] == [f"tiny-bd3-L{b}" for b in BLOCK_SIZES]
    for path in bundled_checkpoints():
        assert (path / "model.safetensors").stat().st_size < 8 * 2**20
        cfg = load_checkpoint(path).config
        assert cfg.head_dim >= 32 and cfg.model_length == 128


def test_heldout_logprobs_are_exact():
    source = Source()
    for d in HELDOUT_DOCS[:50]:
        words = text_words(d.text)
        assert len(words) == d.tokens and math.isclose(source.log_prob(words), d.logprob, rel_tol=1e-12)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_no_bound_beats_the_source(block_size):
    """Per document, NELBO ≥ −log p_model, and E[−log p_model] ≥ E[−log p_true] (cross-entropy ≥ entropy):
    the bound may not undercut the exact log-probability beyond document and Monte Carlo noise."""
    ckpt = load_checkpoint(checkpoint_path(block_size))
    docs = HELDOUT_DOCS[:150]
    ids = [ckpt.encode(d.text) + [ckpt.eos_id] for d in docs]
    per_doc = score_documents(ckpt.model, ids, bos_id=ckpt.tokenizer.bos_token_id, mc_samples=2, seed=1,
                              batch_size=32).mean(dim=1)
    gaps = torch.tensor([b + d.logprob for b, d in zip(per_doc.tolist(), docs)])  # NELBO − (−log p)
    assert gaps.mean() >= -3 * gaps.std() / math.sqrt(len(docs)), (gaps.mean(), gaps.std())
    tokens = sum(d.tokens for d in docs)
    assert per_doc.sum() / tokens < -sum(d.logprob for d in docs) / tokens + 0.5  # the model did learn


def test_samples_are_mostly_valid_documents():
    ckpt = load_checkpoint(checkpoint_path(4))
    valid, finished = sample_validity(ckpt, "first_hitting", n=24, seed=0)
    assert valid >= 0.5 and finished >= valid
