import json
import math

import pytest
import torch

from bd3_plugin.sampling.config import SamplerConfig

from bd3_plugin.sampling.generate import generate
from bd3_plugin.sampling.greedy_completion import greedy_completions
from bd3_plugin.likelihood.nelbo import nelbo_samples
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.sampling.samplers import ddpm_reveal_probability, token_probs
from bd3_plugin.sampling.denoise import denoise_block
from bd3_plugin.sampling.trajectory import BlockRecorder, Trajectory, TrajectoryBuilder
from bd3_plugin.rl.trajectory_scoring import coupled_logprobs, mean_field_logprobs, score_trajectory, shared_noise_nelbo
from helpers import ar_logprobs, assert_close, random_model, tiny_config

# Prompts ending inside a block and on a block boundary; rows stop inside a block (11 tokens, L' = 4).
PROMPTS = [[], [3], [4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
SETTINGS = [dict(temperature=1.0, top_p=1.0), dict(temperature=0.8, top_p=0.9), dict(temperature=0.9, top_p=0.95, top_k=4),
            dict(temperature=0.0, top_p=1.0)]
SAMPLED = [kw for kw in SETTINGS if kw["temperature"] > 0]
ALGORITHMS = ["first_hitting", "ddpm", "threshold"]


def sampler(algorithm, **kw):
    return SamplerConfig(algorithm=algorithm, max_new_tokens=11, steps=6, threshold=0.2, **kw)


def naive_slot_values(model, traj, i):
    """Sampled log-prob, raw log-prob and entropy of slot i, from a block-causal forward (no cache, no
    2L pass) over the clean blocks before its block and the block's state at its pass."""
    size, mask_id, cfg = traj.block_size, traj.mask_id, traj.sampler
    b = int(traj.block[i])
    state = traj.state(b, int(traj.reveal_pass[i]))
    view = torch.cat((traj.sequence()[: b * size], state))
    with torch.no_grad():
        logits = model(view[None])[0, -size:].double()[int(traj.slot[i])]
    logits[mask_id] = -float("inf")
    raw = torch.log_softmax(logits, -1)
    tok = int(traj.tokens[i])
    if cfg.temperature == 0:
        return 0.0, raw[tok].item(), 0.0
    q = token_probs(logits[None], mask_id, cfg.temperature, cfg.top_p, cfg.top_k)[0]
    ent = -sum(p * math.log(p) for p in q.tolist() if p > 0)
    return math.log(q[tok].item()), raw[tok].item(), ent


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_recording_changes_nothing_and_matches_the_generation(algorithm):
    model = random_model()
    for kw in SETTINGS:
        cfg = sampler(algorithm, **kw)
        plain = generate(model, PROMPTS, cfg, seeded_generators(range(4)), eos_id=9)
        rec = generate(model, PROMPTS, cfg, seeded_generators(range(4)), eos_id=9, record=True)
        for g, h, t in zip(plain.generations, rec.generations, rec.trajectories):
            assert g.tokens == h.tokens == t.output and g.finish_reason == t.finish_reason
            assert t.reveal_step[t.in_output].tolist() == g.reveal_steps
            assert t.denoise_passes == g.denoise_steps == int(t.steps.step.max())
            assert not t.seed_drawn and t.seed_replays
        assert sum(t.denoise_passes for t in rec.trajectories) >= rec.denoise_passes


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_recorded_values_equal_a_naive_forward(algorithm):
    model = random_model()
    for kw in SAMPLED:
        out = generate(model, PROMPTS, sampler(algorithm, **kw), seeded_generators(range(4)), record=True)
        for t in out.trajectories:
            gen = (t.reveal_pass > 0).nonzero()[:, 0].tolist()
            naive = torch.tensor([naive_slot_values(model, t, i) for i in gen], dtype=torch.float64)
            got = torch.stack((t.logprob[gen], t.logprob_raw[gen], t.entropy[gen]), dim=1)
            assert_close(got, naive, 1e-5, f"{algorithm} {kw}")


def naive_selection(t):
    """Per step, log-prob of the revealed set from the slots' reveal grid (first-hitting and DDPM)."""
    cfg, out = t.sampler, []
    for blk, grid in zip(t.steps.block.tolist(), t.steps.grid.tolist()):
        here = [(t.block[i] == blk).item() and t.reveal_pass[i] > 0 for i in range(len(t.tokens))]
        masked = sum(1 for i, h in enumerate(here) if h and t.reveal_grid[i] >= grid)
        revealed = sum(1 for i, h in enumerate(here) if h and t.reveal_grid[i] == grid)
        if cfg.algorithm == "first_hitting":
            out.append(-math.log(masked))
        else:
            steps = cfg.steps or t.block_size
            p = ddpm_reveal_probability(1 - grid / steps, 1 - (grid + 1) / steps)
            out.append(revealed * math.log(p) + ((masked - revealed) * math.log(1 - p) if masked > revealed else 0))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm"])
def test_step_table_counts_and_selection_terms(algorithm):
    model = random_model()
    out = generate(model, PROMPTS, sampler(algorithm), seeded_generators(range(4)), record=True)
    for t in out.trajectories:
        st = t.steps
        assert_close(st.logprob_select, naive_selection(t), 1e-12, algorithm)
        for k in range(len(st.block)):
            at = (t.block == st.block[k]) & (t.reveal_grid == st.grid[k]) & (t.reveal_pass > 0)
            assert st.n_revealed[k] == at.sum() and (t.reveal_pass[at] == st.pass_index[k]).all()
            assert torch.isclose(st.logprob_tokens[k], t.logprob[at].sum())
        if algorithm == "first_hitting":
            assert (st.n_revealed == 1).all()


def test_threshold_selection_is_absent_exactly_when_the_fallback_fired():
    model = random_model()
    out = generate(model, PROMPTS, sampler("threshold", temperature=1.0), seeded_generators(range(4)), record=True)
    fallbacks = 0
    for t in out.trajectories:
        st = t.steps
        for k in range(len(st.block)):
            at = (t.block == st.block[k]) & (t.reveal_pass == st.pass_index[k])
            q = torch.exp(t.logprob[at])
            sure = bool((q >= 0.2).any())
            assert bool(st.select_known[k]) == sure and st.logprob_select[k].isnan().item() == (not sure)
            fallbacks += not sure
    assert fallbacks > 0  # the case is exercised


def test_threshold_selection_term_equals_a_naive_sum_over_the_missed_slots():
    model = random_model()
    out = generate(model, PROMPTS, sampler("threshold", temperature=0.7), seeded_generators(range(4)), record=True)
    checked = 0
    for t in out.trajectories:
        st = t.steps
        for k in (k for k in range(len(st.block)) if st.select_known[k]):
            b, p = int(st.block[k]), int(st.pass_index[k])
            view = torch.cat((t.sequence()[: b * 4], t.state(b, p)))
            with torch.no_grad():
                logits = model(view[None])[0, -4:].double()
            logits[:, t.mask_id] = -float("inf")
            q = torch.softmax(logits / 0.7, -1)
            later = (t.block == b) & (t.reveal_pass > p)  # masked at this pass and not revealed by it
            naive = sum(math.log(q[int(s)][q[int(s)] < 0.2].sum().item()) for s in t.slot[later])
            assert abs(st.logprob_select[k].item() - naive) < 1e-5
            checked += bool(later.any())
    assert checked > 3


def test_seed_is_drawn_reported_and_replays_the_row():
    model = random_model()
    cfg = sampler("first_hitting")
    out = generate(model, PROMPTS, cfg, record=True)
    for prompt, t in zip(PROMPTS, out.trajectories):
        assert t.seed_drawn and t.seed_replays
        again = generate(model, [prompt], cfg, seeded_generators([t.seed]), record=True).trajectories[0]
        assert torch.equal(again.tokens, t.tokens) and torch.equal(again.reveal_pass, t.reveal_pass)
    shared = generate(model, PROMPTS[:2], cfg, torch.Generator().manual_seed(3), record=True)
    assert not any(t.seed_replays for t in shared.trajectories)  # rows shared one generator


def test_the_last_block_is_kept_whole_after_the_stop_point():
    model = random_model(tiny_config(block_size=4))
    with torch.no_grad():
        model.backbone.output_layer.linear.bias[9] = 4.0  # EOS (9) likely enough to stop inside a block
    cfg = SamplerConfig(max_new_tokens=40)
    out = generate(model, PROMPTS, cfg, seeded_generators(range(4)), eos_id=9, record=True)
    stopped = 0
    for g, t in zip(out.generations, out.trajectories):
        assert len(t.tokens) % 4 == 0 and (t.reveal_pass[len(t.prompt) % 4 :] > 0).all()
        tail = (t.reveal_pass > 0) & ~t.in_output
        if g.finish_reason == "eos":
            first_tail = int(tail.nonzero()[0])
            assert t.tokens[first_tail] == 9 and first_tail // 4 == len(t.tokens) // 4 - 1
            stopped += tail.sum() > 1
    assert stopped  # some row has tokens after its EOS, kept and marked


# ---- score_trajectory ---------------------------------------------------------------------------------

def assert_scores_equal_record(traj, sc, atol=1e-5, what=""):
    assert torch.equal(sc.scored, traj.reveal_pass > 0)
    for name, rec in (("logprob", traj.logprob), ("logprob_raw", traj.logprob_raw), ("entropy", traj.entropy)):
        assert_close(getattr(sc, name).detach(), rec, atol, f"{what} {name}")
    st = traj.steps
    assert_close(sc.step_logprob_tokens.detach(), st.logprob_tokens, atol, f"{what} step tokens")
    assert torch.equal(sc.step_logprob_select.isnan(), st.logprob_select.isnan()), what
    assert_close(sc.step_logprob_select.detach().nan_to_num(0), st.logprob_select.nan_to_num(0), atol, what)
    assert_close(sc.step_entropy_mean.detach().nan_to_num(0), st.entropy_mean.nan_to_num(0), atol, what)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_score_trajectory_equals_the_rollout(algorithm):
    """Prompts ending inside a block and on its edge; rows stopping inside a block at the length limit
    and at EOS (the tail after the stop is replayed too); all in one batch of mixed lengths."""
    model = random_model()
    for kw in SETTINGS:
        for eos in (None, 9):
            out = generate(model, PROMPTS, sampler(algorithm, **kw), seeded_generators(range(4)), eos_id=eos,
                           record=True)
            for t, sc in zip(out.trajectories, score_trajectory(model, out.trajectories)):
                assert_scores_equal_record(t, sc, what=f"{algorithm} {kw} eos={eos} prompt={len(t.prompt)}")
            if eos is None:
                assert all(len(t.output) == 11 for t in out.trajectories)
                assert all(len(out.trajectories[i].output) < (out.trajectories[i].reveal_pass > 0).sum()
                           for i in (0, 2))  # the limit falls inside a block


def test_score_trajectory_selected_steps_full_vocabulary_and_gradients():
    model = random_model()
    out = generate(model, PROMPTS, sampler("first_hitting", temperature=0.8, top_p=0.9),
                   seeded_generators(range(4)), record=True)
    t = out.trajectories[2]
    chosen = [(int(t.steps.block[k]), int(t.steps.pass_index[k])) for k in (0, 3, 5)]
    sc = score_trajectory(model, [t], steps=[chosen], full_vocab=[chosen[1:]])[0]
    want = torch.zeros(len(t.tokens), dtype=torch.bool)
    for blk, p in chosen:
        want |= (t.block == blk) & (t.reveal_pass == p)
    assert torch.equal(sc.scored, want) and sc.step_scored.sum() == 3
    assert_close(sc.logprob.detach()[want], t.logprob[want], 1e-5, "selected steps")
    assert (sc.logprob.detach()[~want] == 0).all()
    for blk, p in chosen[1:]:
        full = sc.full_logprobs[(blk, p)]
        at = (t.block == blk) & (t.reveal_pass == p)
        assert full.shape == (int(at.sum()), model.config.vocab_size)
        assert_close(full.detach().exp().sum(-1), torch.ones(len(full)), 1e-9, "normalised")
        assert_close(full.detach().gather(-1, t.tokens[at][:, None])[:, 0], t.logprob_raw[at], 1e-5, "full")
    sc.logprob.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_score_trajectory_refuses_a_rollout_longer_than_the_model():
    model = random_model(tiny_config(model_length=8))
    out = generate(model, [[1, 2, 3]], sampler("first_hitting"), seeded_generators([0]), record=True)
    with pytest.raises(ValueError, match="exceeds model_length"):
        score_trajectory(model, out.trajectories)


# ---- the other scorers ----------------------------------------------------------------------------------

def naive_masked_log_probs(model, x_t, x_0):
    """Raw log p(x_0 | x_t) per position of one row, one block-causal forward per block over
    (clean earlier blocks ⊕ the noisy block), independent of the x_t ⊕ x_0 pass."""
    size, mask_id, out = model.config.block_size, model.config.mask_id, []
    for start in range(0, len(x_0), size):
        end = min(start + size, len(x_0))
        view = torch.cat((x_0[:start], x_t[start:end]))
        with torch.no_grad():
            logits = model(view[None])[0, start:end].double()
        logits[:, mask_id] = -float("inf")
        out.append(torch.log_softmax(logits, -1).gather(-1, x_0[start:end, None])[:, 0])
    return torch.cat(out)


COMPLETIONS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [1, 2, 3, 4, 5], [6, 7, 8]]


def test_mean_field_equals_a_per_block_loop():
    model = random_model()
    got = mean_field_logprobs(model, PROMPTS, COMPLETIONS)
    for p, c, g in zip(PROMPTS, COMPLETIONS, got):
        x_0 = torch.tensor(p + c)
        x_t = torch.tensor(p + [model.config.mask_id] * len(c))
        assert_close(g.detach(), naive_masked_log_probs(model, x_t, x_0)[len(p):], 1e-5, "mean field")


def test_mean_field_at_block_size_one_is_the_exact_ar_log_likelihood():
    model = random_model(tiny_config(block_size=1))
    got = mean_field_logprobs(model, [[1, 2]], [[3, 4, 5]])[0]
    assert_close(got.detach(), torch.tensor(ar_logprobs(model, [1, 2], [3, 4, 5]), dtype=torch.float64), 1e-5)


def test_shared_noise_nelbo_scores_two_models_on_one_draw():
    policy, reference = random_model(seed=0), random_model(seed=1)
    x_0 = torch.randint(0, 20, (3, 12), generator=torch.Generator().manual_seed(4))
    terms, draw = shared_noise_nelbo([policy, reference], x_0, seeded_generators([7, 8, 9]), samples=2)
    for model, got in zip((policy, reference), terms):
        alone = nelbo_samples(model, x_0, seeded_generators([7, 8, 9]), samples=2)  # same seeds, same noise
        assert_close(got.detach(), alone.detach(), 1e-6, "shared noise")
    masked = draw.x_t == policy.config.mask_id
    assert masked.any() and not torch.equal(terms[0], terms[1])
    assert ((terms[0] != 0) <= masked.view(3, 2, 12)).all()  # only masked tokens contribute


def test_coupled_masks_are_complementary_and_equal_a_per_block_loop():
    model = random_model()
    mask_id = model.config.mask_id
    sc = coupled_logprobs(model, PROMPTS, COMPLETIONS, seeded_generators(range(4)))
    again = coupled_logprobs(model, PROMPTS[1:2], COMPLETIONS[1:2], seeded_generators([1]))
    n1 = len(PROMPTS[1]) + len(COMPLETIONS[1])
    assert torch.equal(again.mask_a[0], sc.mask_a[1, :n1])  # a row's masks do not depend on the batch
    for j, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        n = len(p) + len(c)
        x_0, a = torch.tensor(p + c), sc.mask_a[j, :n]
        comp = torch.arange(n) >= len(p)
        assert not (a & ~comp).any() and torch.equal(sc.completion[j, :n], comp)
        b = comp & ~a  # every completion token is masked in exactly one view
        la = naive_masked_log_probs(model, torch.where(a, mask_id, x_0), x_0)
        lb = naive_masked_log_probs(model, torch.where(b, mask_id, x_0), x_0)
        assert_close(sc.logprob_a[j, :n].detach(), torch.where(a, la, 0.0), 1e-5, "view A")
        assert_close(sc.logprob_b[j, :n].detach(), torch.where(b, lb, 0.0), 1e-5, "view B")
        t = sc.t[j, :n]
        assert ((t >= 0.2) & (t <= 0.8)).all() and len(set(t[: 4].tolist())) == 1  # one level per block
        expect = torch.where(a, la / t, torch.where(b, lb / (1 - t), 0.0))
        assert_close(sc.weighted[j, :n].detach(), expect, 1e-5, "weighted")


# ---- greedy one-step completions ------------------------------------------------------------------------

def naive_greedy_completion(model, traj, b, p, eos_id, limit):
    """No cache, no batch: block-causal forwards over the whole sequence, one per block."""
    size, mask_id = model.config.block_size, model.config.mask_id
    seq = traj.sequence()[: b * size].tolist()
    block = traj.state(b, p).tolist()
    start = len(traj.prompt) % size if b == traj.first_block else 0
    gen = traj.tokens[: (b - traj.first_block) * size]
    out = gen[traj.reveal_pass[: len(gen)] > 0].tolist()
    while True:
        with torch.no_grad():
            logits = model(torch.tensor([seq + block]))[0, -size:]
        logits[:, mask_id] = -float("inf")
        block = [int(logits[i].argmax()) if block[i] == mask_id else block[i] for i in range(size)]
        new = block[start:]
        if eos_id in new:
            return (out + new[: new.index(eos_id)])[:limit]
        out += new
        if len(out) >= limit:
            return out[:limit]
        seq, block, start = seq + block, [mask_id] * size, 0


def test_greedy_completions_equal_a_naive_loop():
    model = random_model(tiny_config(model_length=16))  # completions run past model_length: the window slides
    cfg = SamplerConfig(max_new_tokens=18)
    out = generate(model, PROMPTS, cfg, seeded_generators(range(4)), record=True)
    states = []
    for t in out.trajectories:
        for k in range(0, len(t.steps.block), 3):
            states.append((t, int(t.steps.block[k]), int(t.steps.pass_index[k])))
    eos = greedy_completions(model, states[:1])[0][6]  # a token greedy decoding does produce
    got = greedy_completions(model, states, eos_id=eos)
    assert len(got) == len(states) > 8
    for (t, b, p), g in zip(states, got):
        assert g == naive_greedy_completion(model, t, b, p, eos, 18), (len(t.prompt), b, p)
    assert any(len(g) < 18 for g in got) and any(len(g) == 18 for g in got)  # EOS and the limit both hit
    for t in out.trajectories:  # past the last pass of the last block: the rollout's own output
        b, p = int(t.block[-1]), int(t.reveal_pass.max()) + 1
        assert greedy_completions(model, [(t, b, p)])[0] == t.output


def test_at_block_size_one_the_replayed_raw_log_probs_are_the_exact_ar_ones():
    model = random_model(tiny_config(block_size=1))
    out = generate(model, [[1, 2], [3]], SamplerConfig(max_new_tokens=6), seeded_generators([0, 1]), record=True)
    for prompt, t, sc in zip([[1, 2], [3]], out.trajectories, score_trajectory(model, out.trajectories)):
        exact = torch.tensor(ar_logprobs(model, prompt, t.output), dtype=torch.float64)
        assert_close(sc.logprob_raw.detach()[t.in_output], exact, 1e-5, "AR")
        assert_close(t.logprob_raw[t.in_output], exact, 1e-5, "AR record")


def test_bad_scoring_requests_are_refused():
    model = random_model()
    out = generate(model, PROMPTS[:2], sampler("first_hitting"), seeded_generators([0, 1]), record=True)
    t = out.trajectories
    with pytest.raises(ValueError, match="steps has 1 entries for 2"):
        score_trajectory(model, t, steps=[None])
    with pytest.raises(ValueError, match="not scored"):
        score_trajectory(model, t, steps=[[(0, 1)], None], full_vocab=[[(0, 2)], ()])
    with pytest.raises(ValueError, match="block size 4"):
        score_trajectory(random_model(tiny_config(block_size=2)), t)
    with pytest.raises(ValueError, match="pass_index counts from 1"):
        greedy_completions(model, [(t[0], 0, 0)])
    with pytest.raises(ValueError, match="was not denoised"):
        t[0].state(99, 1)


def test_a_trajectory_survives_a_json_round_trip():
    model = random_model()
    out = generate(model, PROMPTS, sampler("threshold", temperature=1.0), seeded_generators(range(4)), record=True)
    for t in out.trajectories:
        back = Trajectory.from_json(json.loads(json.dumps(t.to_json())))
        for f in t.__dataclass_fields__:
            a, b = getattr(t, f), getattr(back, f)
            if f == "steps":
                for g in a.__dataclass_fields__:
                    x, y = getattr(a, g), getattr(b, g)
                    assert x.dtype == y.dtype and torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)), g
            elif torch.is_tensor(a):
                assert a.dtype == b.dtype and torch.equal(a, b), f
            else:
                assert a == b, f
    assert any(t.steps.logprob_select.isnan().any() for t in out.trajectories)  # NaN went through as null


@pytest.mark.parametrize("algorithm", ["ddpm", "first_hitting"])
def test_another_engine_records_the_same_trajectory_through_the_denoise_block_seam(algorithm):
    """A cache-free engine (one block-causal forward over the whole sequence per pass, one row) that
    drives `denoise_block` with a `BlockRecorder` and a `TrajectoryBuilder`, as the vLLM runner would.
    Its logits are zero outside the slots read, so the recorder must touch no other slot."""
    model = random_model()
    size, mask_id = model.config.block_size, model.config.mask_id
    cfg = sampler(algorithm, temperature=0.9, top_p=0.9)
    core = generate(model, PROMPTS, cfg, seeded_generators(range(4)), record=True).trajectories
    for row, prompt in enumerate(PROMPTS):
        gen = torch.Generator().manual_seed(row)
        builder = TrajectoryBuilder(prompt, size, mask_id, cfg, row, False, True)
        whole = len(prompt) // size * size
        seq, tail = list(prompt[:whole]), len(prompt) - whole
        out, passes = [], 0
        while len(out) < cfg.max_new_tokens:
            block = torch.full((1, size), mask_id)
            block[0, :tail] = torch.tensor(prompt[whole:], dtype=torch.long)
            def forward(b, read, seq=seq):
                logits = model(torch.cat((torch.tensor([seq], dtype=torch.long), b), dim=1))[:, -size:]
                return torch.where(read[..., None], logits, 0.0)

            rec = BlockRecorder(cfg, mask_id)
            with torch.no_grad():
                done = denoise_block(block, forward, cfg, [gen], mask_id, recorder=rec)
            builder.add_block(rec.finish(), 0, block[0], passes)
            passes += int(done.row_steps[0])
            out += block[0, tail:].tolist()
            seq, tail, whole = seq + block[0].tolist(), 0, len(seq) + size
        t = builder.build(cfg.max_new_tokens, "length", passes, 0)
        c = core[row]
        assert t.output == c.output and torch.equal(t.tokens, c.tokens)
        for f in ("reveal_pass", "reveal_step", "reveal_grid", "in_output"):
            assert torch.equal(getattr(t, f), getattr(c, f)), f
        for f in ("logprob", "logprob_raw", "entropy"):
            assert_close(getattr(t, f), getattr(c, f), 1e-5, f)
        for f in ("block", "pass_index", "step", "grid", "n_masked", "n_revealed", "select_known"):
            assert torch.equal(getattr(t.steps, f), getattr(c.steps, f)), f
        assert_close(t.steps.logprob_select, c.steps.logprob_select, 1e-12, "select")
