import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bd3_plugin.cli.main import main
from bd3_plugin.core.checkpoint import load_checkpoint, save_checkpoint
from bd3_plugin.sampling.config import SamplerConfig
from bd3_plugin.sampling.generate import generate
from bd3_plugin.sampling.greedy_completion import greedy_completions
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.rl.egspo import (LengthBaseline, RLConfig, build_batch, clipped_surrogate, entropy_steps, exact_kl,
    greedy_rewards, group_advantages, update)
from bd3_plugin.rl.engines import CoreEngine
from bd3_plugin.rl.trajectory_scoring import score_trajectory
from early import early_fixture
from helpers import WORDS, random_model, tiny_config, word_tokenizer

BD3 = str(Path(sys.executable).with_name("bd3"))
TARGET = WORDS.index("cat")
BANNED = WORDS.index("dog")


class TargetReward:
    """A toy reward whose optimum is known: the fraction of completion tokens that are "cat"; a
    completion that holds "dog" gets 0 (so `viable` has something to decide)."""

    def __call__(self, prompt, completion, finished):
        if not completion or BANNED in completion:
            return 0.0
        return completion.count(TARGET) / len(completion)

    def viable(self, prompt, tokens):
        return BANNED not in tokens


def _model():
    return random_model(tiny_config(model_length=16), seed=3)


def _rows(model, n=256, seed=10_000):
    out = generate(model, [[0]] * n, SamplerConfig(max_new_tokens=8), seeded_generators(range(seed, seed + n)))
    return [g.tokens for g in out.generations]


def test_pure_pieces_against_naive_formulas():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert group_advantages(rewards, 3).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])
    new, old = torch.tensor([0.0, -0.1, -3.0]), torch.tensor([-1.0, 0.0, -2.0])
    adv = torch.tensor([1.0, -2.0, -1.0])
    loss, ratio = clipped_surrogate(new, old, adv, 0.2, 0.5)
    naive = [-min(r * a, max(min(r, 1.5), 0.8) * a) for r, a in zip((new - old).exp().tolist(), adv.tolist())]
    assert loss.tolist() == pytest.approx(naive) and ratio.tolist() == pytest.approx((new - old).exp().tolist())
    # Length baseline: a bucket's first batch is its own mean; later, the running mean of earlier batches.
    base = LengthBaseline(bucket=4, decay=0.5)
    r1 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    assert base(r1, [8, 9, 20]).tolist() == [0.5, 0.5, 1.0]
    assert base(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), [10, 21, 40]).tolist() == [0.5, 1.0, 0.0]
    assert base.means == {2: 0.75, 5: 0.5, 10: 0.0}
    # A rollout that did not stop is compared with the batch mean, and does not join the running means.
    fresh = LengthBaseline(bucket=4, decay=0.5)
    r2 = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert fresh(r2, [8, 9, 20, 120], [True, True, True, False]).tolist() == [0.5, 0.5, 1.0, 0.5]
    assert fresh.means == {2: 0.5, 5: 1.0}
    p, q = torch.randn(5, 7).log_softmax(-1), torch.randn(5, 7).log_softmax(-1)
    assert exact_kl(p, q).tolist() == pytest.approx(
        torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).tolist(), abs=1e-6)


def test_entropy_steps_and_greedy_rewards_match_a_brute_force():
    model = _model()
    out = generate(model, [[0]] * 12, SamplerConfig(max_new_tokens=12), seeded_generators(range(12)), record=True,
                   eos_id=WORDS.index("."))
    reward, states = TargetReward(), []
    for t in out.trajectories:
        st = t.steps
        # A step matters if some output slot, or the EOS slot right after the output, was revealed then or later.
        out_slots = [i for i in range(len(t.tokens)) if t.in_output[i]]
        gen = [i for i in range(len(t.tokens)) if t.reveal_pass[i] > 0]
        eos = [i for i in gen if not out_slots or i > out_slots[-1]][:1] if t.finish_reason == "eos" else []
        last = max(int(t.reveal_step[i]) for i in out_slots + eos)
        ok = [i for i in range(len(st.block)) if int(st.step[i]) <= last]
        ranked = sorted(ok, key=lambda i: -float(st.entropy_mean[i]))[:3]
        assert sorted(entropy_steps(t, 3)) == sorted((int(st.block[i]), int(st.pass_index[i])) for i in ranked)
        states += [(t, b, p + d) for b, p in entropy_steps(t, 3) for d in (0, 1)]
    full = greedy_completions(model, states, eos_id=WORDS.index("."))
    naive = [reward(s[0].prompt, c, len(c) < 12) for s, c in zip(states, full)]
    assert greedy_rewards(model, states, reward, WORDS.index(".")) == naive
    assert any(r > 0 for r in naive) and any(r == 0 for r in naive)  # the check sees both kinds


def test_loop_raises_the_reward_and_rollouts_replay_exactly(tmp_path):
    torch.manual_seed(0)
    policy = _model()
    ref = copy.deepcopy(policy).requires_grad_(False)
    start = _rows(policy)
    cfg = RLConfig(prompts=4, group=4, steps_per_rollout=4, lr=1e-2, kl_weight=0.01, inner_steps=2, chunk=8,
                   step_weight=0.5)
    engine = CoreEngine(policy, SamplerConfig(max_new_tokens=8), eos_id=None)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    rewards, scored = [], 0
    for it in range(8):
        trajs = [t for g in engine.rollouts([[0], [1], [0, 5], [4]], cfg.group, seed=100 * it) for t in g]
        # Rollout and scorer agree, independently of the loop's own check: every slot, rollout weights.
        with torch.no_grad():
            scores = score_trajectory(engine.model, trajs)
        gap = max((s.logprob - t.logprob)[s.scored].abs().max().item() for s, t in zip(scores, trajs))
        assert gap <= 1e-5
        batch = build_batch(policy, trajs, TargetReward(), cfg, None)
        stats = update(policy, ref, optimizer, batch, cfg)
        assert stats.max_logprob_gap <= 1e-5
        scored += stats.scored_steps
        engine.update(policy, f"rl-{it + 1}")
        assert all(torch.equal(a, b) for a, b in zip(engine.model.state_dict().values(), policy.state_dict().values()))
        rewards.append(batch.rewards.mean().item())
    assert scored > 0
    # Independent check: "cat" frequency in fresh samples (other seeds) of the saved and reloaded model.
    save_checkpoint(policy, tmp_path / "ck", tokenizer=word_tokenizer())
    final = _rows(load_checkpoint(tmp_path / "ck").model)
    freq = lambda rows: sum(r.count(TARGET) for r in rows) / sum(map(len, rows))  # noqa: E731
    # The optimum is known: every token "cat" (reward 1).
    assert freq(start) < 0.2 and freq(final) > 0.9, (freq(start), freq(final), rewards)


@pytest.fixture
def bd3(capsys):
    """`bd3 rl ARGS` in this process (what the console script calls): exit status, stdout and stderr."""
    def run(*args):
        capsys.readouterr()
        rc = main(["rl", *map(str, args)])
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=rc, stdout=out, stderr=err)

    return run


def _one_line_error(r, needle):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("bd3 rl: error: "), r.stderr


def test_cli_runs_on_the_tiny_world_and_refuses_bad_input(bd3, tmp_path):
    out = tmp_path / "run"
    r = bd3("--iterations", 1, "--out", out, "--prompts", 2, "--group", 2, "--steps-per-rollout", 2,
            "--eval-every", 1, "--eval-samples", 4, "--final-samples", 4, "--anchor-weight", 0.5, "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and summary["iterations"] == 1 and rows[0]["max_logprob_gap"] <= 1e-5
    assert set(rows[0]["seconds"]) >= {"rollouts", "scoring", "optimiser"} and "heldout" in rows[0]
    assert (out / "reward.png").stat().st_size > 0
    ck = load_checkpoint(out / "checkpoint")  # strict loading
    assert ck.config.block_size == 16 and ck.eos_id is not None
    _one_line_error(bd3("--iterations", 1, "--out", out), "already holds a run")
    _one_line_error(bd3("--iterations", 0, "--out", tmp_path / "x"), "--iterations must be >= 1")
    _one_line_error(bd3("--iterations", 1, "--out", tmp_path / "x", "--lr", 2), "lr must lie in (0, 1)")
    _one_line_error(bd3("--iterations", 1, "--out", tmp_path / "x", "--group", 0), "group must be a positive")
    _one_line_error(bd3("--iterations", 1, "--out", tmp_path / "x", "--rollout-workers", 2),
                    "--rollout-workers needs --engine vllm")
    _one_line_error(bd3("--iterations", 1, "--out", tmp_path / "x", "--engine", "vllm", "--rollout-workers", 0),
                    "--rollout-workers needs --engine vllm and N >= 1")
    _one_line_error(bd3("--iterations", 1, "--out", tmp_path / "x", "--ray-address", "auto"),
                    "--ray-address is for the engines of --rollout-workers")
    _one_line_error(bd3("--iterations", 1, "--out", tmp_path / "x", "--max-new-tokens", 500),
                    "--max-new-tokens must lie in [1, 125]")
    other = tmp_path / "other"
    save_checkpoint(random_model(), other, tokenizer=word_tokenizer())
    _one_line_error(bd3("--iterations", 1, "--out", tmp_path / "x", "--checkpoint", other),
                    "tokenizer is not the tiny world's")


VLLM_RL = ["--engine", "vllm", "--iterations", "2", "--prompts", "2", "--group", "4", "--steps-per-rollout", "2",
           "--eval-every", "0", "--final-samples", "8", "--json"]


@pytest.fixture(scope="session")
def vllm_rl_run(engines, tmp_path_factory):
    """`bd3 rl --engine vllm` (one engine, in the session's engine process): its output folder."""
    out = tmp_path_factory.mktemp("vllm_rl") / "run"
    assert engines.run("rl", {"argv": [*VLLM_RL, "--out", str(out)]}) == 0
    return out


@early_fixture(lane="ray")
def rollout_pool_run(folder):
    """The same run as `vllm_rl_run` with two engines as Ray actors (`--rollout-workers 2`), as a command:
    (output folder, exit status, stderr)."""
    out = folder / "run"
    done = subprocess.run([BD3, "rl", *VLLM_RL, "--out", str(out), "--rollout-workers", "2"],
                          capture_output=True, text=True, timeout=900)
    return out, done.returncode, done.stderr


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.engine
def test_vllm_engine_rollouts_replay_under_the_updated_weights(vllm_rl_run):
    """Rollouts served by vLLM, weights updated in place after every step: the core scorer, holding the
    trainer's weights, must reproduce each iteration's rollout log-probs (iteration 2's came from the
    engine after its first update, so this also checks that the update landed)."""
    rows = _log(vllm_rl_run)
    assert [row["weight_version"] for row in rows] == ["rl-1", "rl-2"]
    assert all(row["max_logprob_gap"] <= 1e-5 for row in rows) and sum(row["scored_steps"] for row in rows) > 0, rows


@pytest.mark.engine
@pytest.mark.cluster
@pytest.mark.cli
def test_a_pool_of_two_engines_on_ray_trains_as_one_engine(vllm_rl_run, rollout_pool_run):
    """Two engines, each drawing half of every rollout batch with the seeds one engine would use and each
    loading every update: the same rollouts (rewards, lengths, the scorer's gap to each engine's log-probs)
    and the same trained weights, to the bit, as one engine in the trainer's process."""
    out, returncode, stderr = rollout_pool_run
    assert returncode == 0, stderr[-3000:]
    keys = ("reward", "mean_length", "distinct", "max_logprob_gap", "scored_steps", "weight_version")
    pool_rows = [{k: row[k] for k in keys} for row in _log(out)]
    assert pool_rows == [{k: row[k] for k in keys} for row in _log(vllm_rl_run)]
    one = load_checkpoint(vllm_rl_run / "checkpoint").model.state_dict()
    two = load_checkpoint(out / "checkpoint").model.state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert json.loads((out / "summary.json").read_text())["rollout_workers"] == 2


def test_a_pool_splits_prompts_contiguously_and_refuses_what_the_cluster_cannot_hold():
    from ray_jobs.cluster import ClusterError, one_device_each
    from ray_jobs.rollout_pool import _split

    def _resources(cluster, workers):
        return one_device_each(cluster, workers, "--rollout-workers", "engine")

    for count in range(0, 9):
        for parts in range(1, 5):
            ranges = _split(count, parts)
            assert [i for r in ranges for i in r] == list(range(count))  # every prompt once, in order
            sizes = [len(r) for r in ranges]
            assert len(ranges) <= parts and max(sizes, default=0) - min(sizes, default=0) <= 1
    cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0})
    assert _resources(cluster, 2) == {"num_cpus": 1}
    with pytest.raises(ClusterError, match="--rollout-workers 3 needs 3 CPUs .* the Ray cluster has 2"):
        _resources(cluster, 3)
    gpus = SimpleNamespace(cluster_resources=lambda: {"CPU": 16.0, "GPU": 2.0})
    assert _resources(gpus, 2) == {"num_gpus": 1}
    with pytest.raises(ClusterError, match="needs 4 GPUs"):
        _resources(gpus, 4)
