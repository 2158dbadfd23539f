"""Tiny seeded models, a word-level tokenizer and a parity helper shared by the tests."""
from __future__ import annotations

import torch

from bd3_plugin.config import BD3Config
from bd3_plugin.model import BD3LM

WORDS = ["the", "a", "cat", "dog", "bird", "sees", "likes", "runs", "sleeps", "big", "small", "red", "and", ".",
         ",", "quickly", "slowly", "over", "under", "tree"]


def tiny_config(**overrides) -> BD3Config:
    base = dict(vocab_size=len(WORDS) + 3, model_length=32, block_size=4, hidden_dim=64, n_heads=2, n_blocks=2,
                cond_dim=16, dropout=0.0, mask_token_id=len(WORDS) + 2)
    return BD3Config(**(base | overrides))


def random_model(cfg: BD3Config | None = None, seed: int = 0) -> BD3LM:
    """Every weight drawn at random (adaLN included), so that the function is not trivial."""
    with torch.device("cpu"):  # the generator is a CPU one; the weights move to the default device after
        model = BD3LM(cfg or tiny_config())
        model.reset_parameters(torch.Generator().manual_seed(seed), adaln_zero=False)
    return model.to(torch.get_default_device()).eval()


def ar_logprobs(model: BD3LM, context: list[int], tokens: list[int]) -> list[float]:
    """log p(token_i | context, tokens_<i) of an L' = 1 model, one forward per token with a mask in the
    token's slot: the exact AR log-probabilities, computed independently of the NELBO code."""
    mask_id, out = model.config.mask_id, []
    for i, tok in enumerate(tokens):
        with torch.no_grad():
            logits = model(torch.tensor([context + tokens[:i] + [mask_id]]))[0, -1].double()
        logits[mask_id] = -float("inf")
        out.append(torch.log_softmax(logits, -1)[tok].item())
    return out


def word_tokenizer():
    """A word-level fast tokenizer over WORDS with [EOS] and [MASK], as transformers loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {"[UNK]": len(WORDS), "[EOS]": len(WORDS) + 1,
                                                    "[MASK]": len(WORDS) + 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", mask_token="[MASK]")


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str = "") -> None:
    """Parity with a report of the max and mean absolute difference."""
    diff = (a.double() - b.double()).abs()
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.3e} (mean {diff.mean():.3e}) > {atol:.1e}"
