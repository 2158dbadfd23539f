"""`bd3 rl`: the EGSPO-style loop (rl.py) on the tiny world, with a per-iteration JSON log, a reward curve,
held-out checks and the final checkpoint."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bd3_plugin.cli.common import UsageError, subparser, user_input
from bd3_plugin.rl.egspo import LengthBaseline, RLConfig, build_batch, finished, update
from bd3_plugin.rl.engines import CoreEngine

ENGINES = ("core", "vllm")
EVAL_SEED = 1 << 40  # evaluation seeds, disjoint from the rollouts'; the same in every run


def add_parser(sub) -> None:
    from bd3_plugin.tinyworld.data import checkpoint_path

    rl = subparser(sub, "rl", help="EGSPO-style RL on the tiny world: reward = validity of sampled documents")
    rl.add_argument("--iterations", type=int, required=True, help="RL iterations (one rollout batch each)")
    rl.add_argument("--out", type=Path, required=True, help="folder for log.jsonl, reward.png, checkpoint/")
    rl.add_argument("--checkpoint", default=str(checkpoint_path(16)), help="default: the bundled tiny-bd3-L16")
    rl.add_argument("--engine", choices=ENGINES, default="core", help="rollout engine")
    rl.add_argument("--rollout-workers", type=int, default=None,
                    help="with --engine vllm: N engines as Ray actors (one GPU each, else one CPU), the weights "
                         "broadcast to all after each step (default: one engine in this process)")
    rl.add_argument("--ray-address", default=None,
                    help="with --rollout-workers: the Ray cluster to join ('auto': RAY_ADDRESS or the running "
                         "one; default: a new local instance)")
    rl.add_argument("--seed", type=int, default=0, help="seed of prompts, rollouts and the anchor rows")
    d = RLConfig()
    helps = {"prompts": "prompts per iteration", "group": "G: rollouts per prompt",
             "steps_per_rollout": "K: entropy-selected steps trained per rollout",
             "inner_steps": "optimiser steps per rollout batch", "chunk": "trajectories scored per replay",
             "lr": "AdamW learning rate", "kl_weight": "beta: weight of the KL to the starting policy",
             "step_weight": "lambda: weight of the greedy one-step reward difference (0: off; above 0 it "
                            "shortens documents, docs/RL.md)",
             "clip_low": "ratios are clipped to [1 - clip_low, 1 + clip_high]", "clip_high": "see --clip-low",
             "grad_clip": "gradient norm clip",
             "anchor_weight": "weight of the NELBO of source documents that keeps the model a language model"}
    for name, text in helps.items():
        default = getattr(d, name)
        rl.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=text)
    rl.add_argument("--baseline", choices=("group", "length"), default="length",
                    help="sequence baseline: the prompt's group mean, or a running mean by document length "
                         "(holds the documents' length, docs/RL.md)")
    rl.add_argument("--anchor-rows", type=int, default=8,
                    help="rows of source documents in the anchor NELBO per step (with --anchor-weight > 0)")
    rl.add_argument("--logprob-weight", type=float, default=0.0,
                    help="reward of a valid document: 1 + this · its exact log-prob per token")
    rl.add_argument("--max-new-tokens", type=int, default=None,
                    help="rollout budget (default: the model length minus the longest prompt, so that a "
                         "rollout fits in one replay pass)")
    rl.add_argument("--time-limit", type=float, default=None,
                    help="stop after this many seconds of training (default: none)")
    rl.add_argument("--eval-every", type=int, default=10, help="held-out check every N iterations (0: off)")
    rl.add_argument("--eval-samples", type=int, default=256, help="samples of each held-out check")
    rl.add_argument("--final-samples", type=int, default=1024, help="samples of the start and final checks")
    rl.add_argument("--json", action="store_true", help="print the summary as JSON")


def _check(args) -> None:
    if args.iterations < 1:
        raise UsageError(f"--iterations must be >= 1, got {args.iterations}")
    if args.eval_every < 0 or args.eval_samples < 1 or args.final_samples < 1:
        raise UsageError("--eval-every must be >= 0; --eval-samples and --final-samples must be >= 1")
    if args.anchor_rows < 1:
        raise UsageError(f"--anchor-rows must be >= 1, got {args.anchor_rows}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise UsageError(f"--time-limit must be > 0, got {args.time_limit}")
    if args.rollout_workers is not None and (args.engine != "vllm" or args.rollout_workers < 1):
        raise UsageError(f"--rollout-workers needs --engine vllm and N >= 1, got --engine {args.engine} "
                         f"--rollout-workers {args.rollout_workers}")
    if args.ray_address is not None and args.rollout_workers is None:
        raise UsageError("--ray-address is for the engines of --rollout-workers; give both or neither")
    if (args.out / "log.jsonl").exists():
        raise UsageError(f"{args.out} already holds a run (log.jsonl); choose another --out")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is not a folder")


def _check_vocabulary(tokenizer) -> None:
    from bd3_plugin.tinyworld.grammar import DEFAULT_LEXICON, EOS

    missing = set(DEFAULT_LEXICON.words()) | {EOS}
    missing -= set(tokenizer.get_vocab())
    if missing:
        raise UsageError(f"the checkpoint's tokenizer is not the tiny world's: it lacks {sorted(missing)[:5]}")


def _rollout_stats(trajs, reward) -> dict:
    from bd3_plugin.tinyworld.validity import document_stats

    stats = document_stats(reward.source, [reward.words(t.prompt, t.output) for t in trajs], list(map(finished, trajs)))
    return {"validity": stats.validity, "mean_length": stats.mean_length, "distinct": stats.distinct}


@dataclass
class _Run:
    """Everything one `bd3 rl` run holds across iterations."""

    args: Any
    cfg: RLConfig
    ckpt: Any
    ref: Any
    engine: Any
    reward: Any
    anchor: Any
    baseline: LengthBaseline | None
    optimizer: Any
    pool: list[list[int]]
    eval_sampler: Any

    def check(self, samples: int) -> dict:
        from bd3_plugin.tinyworld.rl_task import evaluate

        return asdict(evaluate(self.ckpt.model, self.ckpt.tokenizer, self.eval_sampler, samples=samples,
                               seed=EVAL_SEED))


def _setup(args) -> _Run:
    import torch

    from bd3_plugin.core.checkpoint import load_checkpoint
    from bd3_plugin.sampling.config import SamplerConfig
    from bd3_plugin.tinyworld.rl_task import DocumentReward, SourceNelbo, training_prompts

    _check(args)
    with user_input():
        cfg = RLConfig(**{k: getattr(args, k) for k in RLConfig.__dataclass_fields__})
    ckpt = load_checkpoint(args.checkpoint)
    _check_vocabulary(ckpt.tokenizer)
    torch.manual_seed(args.seed)
    policy = ckpt.model.eval()  # dropout off: the scorer must replay the rollout exactly
    tok = ckpt.tokenizer
    pool = training_prompts(tok, args.iterations * cfg.prompts, seed=args.seed)
    longest = max(len(p) for p in pool)
    budget = ckpt.config.model_length - longest
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens <= budget:
        raise UsageError(f"--max-new-tokens must lie in [1, {budget}] (model length {ckpt.config.model_length}, "
                         f"prompts up to {longest} tokens), got {args.max_new_tokens}")
    sampler = SamplerConfig(algorithm="first_hitting", temperature=1.0, max_new_tokens=args.max_new_tokens or budget)
    engine = (CoreEngine(policy, sampler, ckpt.eos_id) if args.engine == "core"
              else _vllm_engine(ckpt, sampler, args))
    args.out.mkdir(parents=True, exist_ok=True)
    return _Run(args, cfg, ckpt, copy.deepcopy(policy).requires_grad_(False), engine,
                DocumentReward(tok, args.logprob_weight),
                SourceNelbo(policy, tok, args.anchor_rows, args.seed) if cfg.anchor_weight > 0 else None,
                LengthBaseline() if args.baseline == "length" else None,
                torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0), pool,
                SamplerConfig(algorithm="first_hitting", temperature=1.0, max_new_tokens=128))


def _vllm_engine(ckpt, sampler, args):
    try:
        from vllm_backend.rollout import VLLMEngine
    except ImportError as err:
        raise UsageError(f"--engine vllm needs vLLM ({err}); install bd3-plugin[cpu] or [gpu]") from None
    if args.rollout_workers is None:
        return VLLMEngine(ckpt.path, sampler, ckpt.config.model_length, args.seed)
    try:
        from ray_jobs.rollout_pool import PoolError, RolloutPool
    except ImportError as err:
        raise UsageError(f"--rollout-workers needs Ray ({err}); install bd3-plugin[ray]") from None
    try:
        return RolloutPool(ckpt.path, sampler, ckpt.config.model_length, args.seed, args.rollout_workers,
                           args.ray_address)
    except PoolError as err:
        raise UsageError(str(err)) from None


def _iteration(run: _Run, it: int) -> dict:
    """One iteration, timed part by part; returns its log row."""
    cfg = run.cfg
    policy = run.ckpt.model
    w0 = time.perf_counter()
    c0 = time.process_time()
    prompts = run.pool[it * cfg.prompts : (it + 1) * cfg.prompts]
    groups = run.engine.rollouts(prompts, cfg.group, seed=run.args.seed * 10**9 + it * cfg.prompts * cfg.group)
    trajs = [t for g in groups for t in g]
    w1 = time.perf_counter()
    batch = build_batch(policy, trajs, run.reward, cfg, run.ckpt.eos_id, run.baseline)
    w2 = time.perf_counter()
    stats = update(policy, run.ref, run.optimizer, batch, cfg, run.anchor)
    w3 = time.perf_counter()
    run.engine.update(policy, f"rl-{it + 1}")
    w4 = time.perf_counter()
    c4 = time.process_time()
    return {"iteration": it + 1, "reward": batch.rewards.mean().item(), **_rollout_stats(trajs, run.reward),
            "kl": stats.kl, "loss": stats.loss, "ratio_mean": stats.ratio_mean, "clipped": stats.clipped,
            "max_logprob_gap": stats.max_logprob_gap, "scored_steps": stats.scored_steps,
            "anchor": stats.anchor, "weight_version": f"rl-{it + 1}",
            "seconds": {"rollouts": w1 - w0, "advantages": w2 - w1, "scoring": stats.seconds_scoring,
                        "optimiser": stats.seconds_optimiser, "weight_update": w4 - w3, "total": w4 - w0},
            "cpu_seconds": c4 - c0}


def run(args) -> dict:
    from tqdm import tqdm

    from bd3_plugin.core.checkpoint import save_checkpoint
    from bd3_plugin.tinyworld.rl_task import source_reference

    run = _setup(args)
    start = run.check(args.final_samples)
    rows = []
    t_train = 0.0
    cpu_train = 0.0
    bar = tqdm(total=args.iterations, desc="bd3 rl", disable=args.json)
    with (args.out / "log.jsonl").open("w") as log:
        for it in range(args.iterations):
            row = _iteration(run, it)
            t_train += row["seconds"]["total"]
            cpu_train += row["cpu_seconds"]
            row["train_seconds"] = t_train
            if args.eval_every and (it + 1) % args.eval_every == 0:
                row["heldout"] = run.check(args.eval_samples)
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update()
            bar.set_postfix(reward=f"{row['reward']:.2f}", length=f"{row['mean_length']:.1f}")
            if args.time_limit is not None and t_train >= args.time_limit:
                break
    bar.close()
    run.engine.close()
    final = run.check(args.final_samples)
    save_checkpoint(run.ckpt.model, args.out / "checkpoint", tokenizer=run.ckpt.tokenizer)
    summary = {"iterations": len(rows), "train_wall_seconds": t_train, "train_cpu_seconds": cpu_train,
               "start": start, "final": final, "source": source_reference(args.final_samples),
               "config": asdict(run.cfg), "baseline": args.baseline, "engine": args.engine, "seed": args.seed,
               "rollout_workers": args.rollout_workers or 1,
               "seconds": {k: sum(r["seconds"][k] for r in rows) for k in rows[0]["seconds"]},
               "max_logprob_gap": max(r["max_logprob_gap"] for r in rows)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_rewards(rows, start, final, args.out / "reward.png")
    if not args.json:
        print(f"validity {start['validity']:.1%} -> {final['validity']:.1%} (held-out prompts, "
              f"{args.final_samples} samples); NLL bound {start['nll_bound']:.3f} -> {final['nll_bound']:.3f}; "
              f"{len(rows)} iterations in {t_train:.0f} s wall, {cpu_train:.0f} s CPU; wrote {args.out}")
    return summary


def plot_rewards(rows: list[dict], start: dict, final: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in rows]
    rew = [r["reward"] for r in rows]
    window = max(1, len(rows) // 20)
    smooth = [sum(rew[max(0, i - window + 1) : i + 1]) / len(rew[max(0, i - window + 1) : i + 1])
              for i in range(len(rew))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(its, rew, color="0.75", lw=0.8, label="rollout reward (per iteration)")
    ax.plot(its, smooth, color="C0", lw=1.8, label=f"rollout reward ({window}-iteration mean)")
    held = [(r["iteration"], r["heldout"]["validity"]) for r in rows if "heldout" in r]
    pts = [(0, start["validity"])] + held + [(its[-1], final["validity"])]
    ax.plot(*zip(*pts), "o-", color="C3", lw=1.2, ms=4, label="held-out validity")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward / validity")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
