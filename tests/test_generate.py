import pytest
import torch

from bd3_plugin.sampling.config import SamplerConfig

from bd3_plugin.sampling.generate import generate
from bd3_plugin.core.generators import seeded_generators
from helpers import random_model, tiny_config

PROMPTS = [[], [3], [4, 5, 6], [7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9], list(range(13))]


def naive_greedy(model, prompt, n_new, threshold=float("inf")):
    """Reference: no cache, no batching. Every step re-runs a block-causal forward over the whole sequence
    (windowed past model_length) and reveals by argmax every masked slot whose confidence reaches the
    threshold, or else the single most confident one (leftmost among ties): with no threshold, greedy
    first-hitting."""
    size, mask_id = model.config.block_size, model.config.mask_id
    whole = len(prompt) // size * size
    seq, block, tail = list(prompt[:whole]), list(prompt[whole:]), len(prompt) - whole
    block += [mask_id] * (size - len(block))
    out = []
    while len(out) < n_new:
        while mask_id in block:
            with torch.no_grad():
                logits = model(torch.tensor([seq + block]))[0, -size:].double()
            logits[:, mask_id] = -float("inf")
            conf, tok = torch.softmax(logits, -1).max(-1)
            masked = [i for i in range(size) if block[i] == mask_id]
            top = max(conf[i].item() for i in masked)
            best = min(i for i in masked if conf[i].item() >= top - 1e-6)
            sure = [i for i in masked if conf[i] >= threshold] or [best]
            for i in sure:
                block[i] = int(tok[i])
        out += block[tail:]
        seq += block
        block, tail = [mask_id] * size, 0
    return out[:n_new]


@pytest.mark.parametrize("block_size", [1, 4, 8])
def test_cached_batched_greedy_equals_naive_sampler(block_size):
    model = random_model(tiny_config(block_size=block_size, model_length=16))
    cfg = SamplerConfig(algorithm="threshold", threshold=0.3, temperature=0.0, max_new_tokens=22)
    result = generate(model, PROMPTS, cfg, seeded_generators(range(len(PROMPTS))))
    for prompt, g in zip(PROMPTS, result.generations):  # 13 + 22 tokens: past model_length 16
        assert g.tokens == naive_greedy(model, prompt, 22, 0.3), prompt


@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm", "threshold"])
def test_rows_do_not_depend_on_the_batch(algorithm):
    model = random_model()
    cfg = SamplerConfig(algorithm=algorithm, max_new_tokens=14, top_p=0.9, steps=6)
    batch = generate(model, PROMPTS, cfg, seeded_generators(range(len(PROMPTS))))
    for i in (0, 3, 5):
        alone = generate(model, [PROMPTS[i]], cfg, seeded_generators([i])).generations[0]
        assert alone.tokens == batch.generations[i].tokens
        assert alone.reveal_steps == batch.generations[i].reveal_steps


@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm", "threshold"])
def test_samples_are_seeded_and_well_formed(algorithm):
    model = random_model()
    mask_id = model.config.mask_id
    cfg = SamplerConfig(algorithm=algorithm, max_new_tokens=11)
    a = generate(model, PROMPTS, cfg, seeded_generators([5] * len(PROMPTS)))
    b = generate(model, PROMPTS, cfg, seeded_generators([5] * len(PROMPTS)))
    c = generate(model, PROMPTS, cfg, seeded_generators([6] * len(PROMPTS)))
    assert [g.tokens for g in a.generations] == [g.tokens for g in b.generations]
    assert [g.tokens for g in a.generations] != [g.tokens for g in c.generations]
    for g in a.generations:
        assert len(g.tokens) == 11 and g.finish_reason == "length"
        assert mask_id not in g.tokens and all(0 <= t < model.config.vocab_size for t in g.tokens)
        assert len(g.reveal_steps) == 11 and all(1 <= s <= g.denoise_steps for s in g.reveal_steps)


def test_first_hitting_spends_one_pass_per_token():
    model = random_model()
    out = generate(model, [[1, 2, 3]], SamplerConfig(max_new_tokens=13), seeded_generators([0]))
    g = out.generations[0]
    # 1 masked slot in the prompt's block, then 3 full blocks: 13 reveals, 13 denoising passes.
    assert out.denoise_passes == g.denoise_steps == 13 and sorted(g.reveal_steps) == list(range(1, 14))
    assert out.commit_passes == 0  # blocks 0-2 are stored by the next block's first pass, the last never


def test_ddpm_caching_never_spends_more_passes_than_tokens():
    model = random_model()
    out = generate(model, [[1, 2, 3, 4]], SamplerConfig(algorithm="ddpm", steps=64, max_new_tokens=16),
                   seeded_generators([0]))
    assert out.denoise_passes <= 16


def test_threshold_reveals_several_tokens_per_pass_when_confident():
    model = random_model()
    with torch.no_grad():
        model.backbone.output_layer.linear.bias[5] = 30.0  # token 5 is near certain everywhere
    out = generate(model, [[1]], SamplerConfig(algorithm="threshold", max_new_tokens=15), seeded_generators([0]))
    assert out.generations[0].tokens == [5] * 15 and out.denoise_passes == 4  # one pass per block


def test_eos_stops_a_row_and_is_not_returned():
    model = random_model()
    with torch.no_grad():
        model.backbone.output_layer.linear.bias[9] = 30.0
    out = generate(model, [[1, 2], [3]], SamplerConfig(max_new_tokens=20), seeded_generators([0, 1]), eos_id=9)
    assert [g.finish_reason for g in out.generations] == ["eos", "eos"]
    assert all(g.tokens == [] for g in out.generations)


def test_entropy_rule_stops_degenerate_text():
    model = random_model()
    with torch.no_grad():
        model.backbone.output_layer.linear.bias[5] = 30.0
    cfg = SamplerConfig(max_new_tokens=40, entropy_stop=0.5, entropy_window=8)
    g = generate(model, [[1, 2]], cfg, seeded_generators([0])).generations[0]
    assert g.finish_reason == "entropy" and 8 <= len(g.tokens) + 2 < 16


def test_bad_requests():
    model = random_model()
    with pytest.raises(ValueError, match="mask id"):
        generate(model, [[1, model.config.mask_id]], SamplerConfig(), seeded_generators([0]))
    for kwargs, needle in [({"algorithm": "beam"}, "algorithm must be one of"), ({"threshold": 0.0}, "threshold"),
                           ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"),
                           ({"temperature": -1.0}, "temperature"), ({"top_k": -1}, "top_k must be an integer >= 0"),
                           ({"top_k": 2.0}, "top_k"), ({"top_k": True}, "top_k")]:
        with pytest.raises(ValueError, match=needle):
            SamplerConfig(**kwargs)


@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm", "threshold"])
def test_top_k_one_at_temperature_one_gives_the_greedy_tokens(algorithm):
    """At L' = 1 every sampler reveals the one slot, so top_k = 1 (the argmax, lowest id among ties) at
    temperature 1 must give greedy decoding's tokens whatever the seeds."""
    model = random_model(tiny_config(block_size=1))
    greedy = generate(model, PROMPTS, SamplerConfig(algorithm=algorithm, temperature=0.0, max_new_tokens=9))
    for seed in (0, 17):
        cfg = SamplerConfig(algorithm=algorithm, temperature=1.0, top_k=1, max_new_tokens=9)
        out = generate(model, PROMPTS, cfg, seeded_generators(range(seed, seed + len(PROMPTS))))
        assert [g.tokens for g in out.generations] == [g.tokens for g in greedy.generations]


@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm", "threshold"])
def test_greedy_ignores_the_filters(algorithm):
    """At temperature 0 top-k and top-p do not apply (as in vLLM, which drops them from greedy requests):
    the confidences that order the reveals are the model's own probabilities."""
    model = random_model()
    plain = generate(model, PROMPTS, SamplerConfig(algorithm=algorithm, temperature=0.0, max_new_tokens=13))
    filtered = generate(model, PROMPTS, SamplerConfig(algorithm=algorithm, temperature=0.0, max_new_tokens=13,
                                                      top_k=2, top_p=0.5))
    assert [g.tokens for g in filtered.generations] == [g.tokens for g in plain.generations]
    assert [g.reveal_steps for g in filtered.generations] == [g.reveal_steps for g in plain.generations]


@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm", "threshold"])
def test_temperature_zero_is_deterministic_without_seeds_and_in_any_batch(algorithm):
    model = random_model()
    cfg = SamplerConfig(algorithm=algorithm, temperature=0.0, max_new_tokens=13, top_p=0.9, steps=6)
    unseeded = [g.tokens for g in generate(model, PROMPTS, cfg).generations]
    assert unseeded == [g.tokens for g in generate(model, PROMPTS, cfg).generations]
    gens = seeded_generators(range(len(PROMPTS)))
    states = [g.get_state() for g in gens]
    seeded = generate(model, PROMPTS, cfg, gens)
    assert [g.tokens for g in seeded.generations] == unseeded
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))  # nothing was drawn
    shared = generate(model, PROMPTS, cfg, torch.Generator().manual_seed(99))
    assert [g.tokens for g in shared.generations] == unseeded
    for i in (0, 2, 5):
        alone = generate(model, [PROMPTS[i]], cfg).generations[0]
        assert alone.tokens == unseeded[i] and alone.reveal_steps == seeded.generations[i].reveal_steps


def test_greedy_first_hitting_and_ddpm_equal_a_naive_most_confident_first_loop():
    model = random_model(tiny_config(block_size=4, model_length=16))
    prompts = [[], [4, 5, 6, 7], list(range(8))]  # whole blocks: DDPM's default grid reveals one per step
    for algorithm in ("first_hitting", "ddpm"):
        cfg = SamplerConfig(algorithm=algorithm, temperature=0.0, max_new_tokens=7)
        out = generate(model, prompts, cfg)
        for prompt, g in zip(prompts, out.generations):
            assert g.tokens == naive_greedy(model, prompt, 7), (algorithm, prompt)
