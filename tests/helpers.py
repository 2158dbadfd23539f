"""Tiny seeded models, a word-level tokenizer and a parity helper shared by the tests."""
from __future__ import annotations

import torch

from bd3_plugin.core.config import BD3Config
from bd3_plugin.core.model import BD3LM

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


def perturb(model: BD3LM, seed: int = 0) -> BD3LM:
    """Every tensor moved by seeded noise (0.3 of its spread): same shapes, other weights, other tokens."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=gen))
    return model


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


def naive_sample(model: BD3LM, prompt: list[int], config, seed: int, n_new: int) -> tuple[list[int], int]:
    """Reference sampler for one row at temperature > 0: no cache, no batching, no commit; every pass is a
    block-causal forward over the whole sequence (windowed past model_length) computing every slot's
    logits. The row's generator is drawn from in the samplers' order: first-hitting the position, then the
    token; DDPM a coin per masked slot, then the revealed tokens; threshold a token at every masked slot.
    DDPM passes only when the block changed (caching). Returns the tokens and the passes."""
    from bd3_plugin.sampling.samplers import ddpm_reveal_probability, draw_tokens, greedy_positions, token_probs

    gen, size, mask_id = torch.Generator().manual_seed(seed), model.config.block_size, model.config.mask_id
    whole = len(prompt) // size * size
    seq, block = list(prompt[:whole]), list(prompt[whole:]) + [mask_id] * (size - len(prompt) + whole)
    out, passes, tail, steps = [], 0, len(prompt) - whole, config.steps or size
    rand = lambda *shape: torch.rand(shape, generator=gen, dtype=torch.float64)  # noqa: E731
    while len(out) < n_new:
        grid, changed = 0, True
        while mask_id in block:
            masked = [i for i in range(size) if block[i] == mask_id]
            if changed:
                with torch.no_grad():
                    logits = model(torch.tensor([seq + block]))[0, -size:]
                passes += 1
            q = token_probs(logits, mask_id, config.temperature, config.top_p, config.top_k)  # (L', V)
            if config.algorithm == "first_hitting":
                reveal = [masked[int(rand(1).item() * len(masked))]]
                new = {i: int(draw_tokens(q[i : i + 1], rand(1, q.shape[1]))[0]) for i in reveal}
            elif config.algorithm == "ddpm":
                coins = rand(len(masked)).tolist()
                p = ddpm_reveal_probability(1 - grid / steps, 1 - (grid + 1) / steps)
                reveal = [i for i, u in zip(masked, coins) if u < p]
                drawn = draw_tokens(q[reveal], rand(len(reveal), q.shape[1])) if reveal else []
                new = dict(zip(reveal, map(int, drawn)))
            else:
                drawn = draw_tokens(q[masked], rand(len(masked), q.shape[1]))
                new = dict(zip(masked, map(int, drawn)))
                conf = {i: q[i, t].item() for i, t in new.items()}
                reveal = [i for i in masked if conf[i] >= config.threshold]
                if not reveal:
                    c = torch.tensor([conf.get(i, -1.0) for i in range(size)], dtype=torch.float64)
                    one = greedy_positions(c[None], torch.tensor([[block[i] == mask_id for i in range(size)]]),
                                           torch.tensor([1]))[0]
                    reveal = [int(one.nonzero()[0])]
            for i in reveal:
                block[i] = new[i]
            changed, grid = bool(reveal) or config.algorithm != "ddpm", grid + 1
        out += block[tail:]
        seq, block, tail = seq + block, [mask_id] * size, 0
    return out[:n_new], passes



def run_lm_eval(*args, cwd, timeout: float = 900):
    """The `lm_eval` command in a subprocess, offline, in `cwd`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([str(Path(sys.executable).with_name("lm_eval")), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def greedy_generation(ckpt, prompt: str, max_new_tokens: int, algorithm: str = "first_hitting"):
    """The core's generation at temperature 0 after the text prompt (a `Generation`: tokens, finish reason):
    what a server must answer. Its text as a server returns it is " " + ckpt.decode(tokens) (the completion is
    decoded as a continuation of the prompt)."""
    from bd3_plugin.core.generators import seeded_generators
    from bd3_plugin.sampling.config import SamplerConfig
    from bd3_plugin.sampling.generate import generate

    config = SamplerConfig(algorithm=algorithm, temperature=0.0, max_new_tokens=max_new_tokens)
    out = generate(ckpt.model, [ckpt.encode(prompt)], config, seeded_generators([0]), eos_id=ckpt.eos_id)
    return out.generations[0]
