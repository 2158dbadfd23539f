"""Parallel decoding: BD3 through the vLLM backend against an autoregressive Llama of the same width, depth
and vocabulary (random weights) in the same vLLM, side by side in one run, ratios printed. Three parts:

- copy: the copy task's held-out items with tiny-bd3-copy-L16 and the threshold sampler (temperature 0) at
  a threshold chosen by a sweep with the core sampler (the most tokens per denoising pass with at least
  98% exact answers); exact correctness of the backend's answers, tokens per pass, tokens/s.
- grammar: the grammar checkpoint tiny-bd3-L4 (by default), first-hitting, temperature 1, EOS ignored:
  model passes per generated token and tokens/s, and the core sampler at batch 1 for reference.
- released: a random-weight BD3-LM at the released shape (12 × 768, vocabulary 50,258), first-hitting,
  against the same-shape Llama; beside the measured ratio, the token positions each model computes per
  generated token through the layers and the output layer, and the ratio that arithmetic predicts.

    python bench/bench_vllm.py [--only copy|grammar|released] [--requests N] [--repeats R] [--threads T] ...

Progress goes to stderr, results to stdout. Both models run eager or compiled as vLLM chooses for them
(the BD3 backend runs eager, vLLM compiles the Llama), with the same number of torch threads (`--threads`,
default 1: on a shared machine, two threads stall each other at every pass whenever another job holds a
core). Tokens/s are wall-clock; the ratio is also given per second of the process's CPU time, which other
jobs' load disturbs less. The token positions are counted by wrapping the model's `forward` and
`compute_logits` in the (in-process) worker, the same way for both models.
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
from dataclasses import replace

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the position counters need it
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_args import PARTS, parse_args  # noqa: E402
from vllm_timing import MAX_MODEL_LEN, make_llama, make_released_bd3, progress, run_engine  # noqa: E402

MIN_CORRECT = 0.98


def same_shape_llama(ckpt, work: str) -> str:
    """The Llama of this checkpoint's shape, written once per run into `work` and shared by the parts:
    vLLM's compile cache then serves its second engine."""
    cfg = ckpt.config
    folder = os.path.join(work, f"llama-{cfg.n_blocks}x{cfg.hidden_dim}-h{cfg.n_heads}-v{cfg.vocab_size}"
                                f"-L{cfg.model_length}")
    if not os.path.isdir(folder):
        progress(f"writing the same-shape Llama to {folder}")
        make_llama(cfg, ckpt.tokenizer, folder)
    return folder


def engine(model: str, prompts, args, waves: int | None = None, **params):
    """Every concurrency level of one engine, best of `args.repeats`, with these SamplingParams."""
    from vllm import SamplingParams

    return run_engine(model, prompts, SamplingParams(seed=0, detokenize=False, **params), args.concurrency,
                      args.repeats, waves)


def table(bd3_runs, ar_runs, correct=None) -> None:
    """One row per concurrency: BD3 and AR tokens/s and their ratio (wall-clock, and per second of the
    process's CPU time), generated tokens per batched model pass."""
    print("| concurrency | BD3 tok/s | AR tok/s | BD3/AR | BD3/AR (CPU time) | BD3 tokens/pass | AR tokens/pass |"
          + (" BD3 correct |" if correct else ""))
    print("|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if correct else ""))
    for b, a in zip(bd3_runs, ar_runs):
        row = (f"| {b.concurrency} | {b.tokens_per_s:.1f} | {a.tokens_per_s:.1f} | "
               f"{b.tokens_per_s / a.tokens_per_s:.2f}x | {b.tokens_per_cpu_s / a.tokens_per_cpu_s:.2f}x | "
               f"{b.tokens / b.passes:.2f} | {a.tokens / a.passes:.2f} |")
        print(row + (f" {100 * correct(b):.1f}% |" if correct else ""))


# ---- copy -------------------------------------------------------------------------------------------
def choose_threshold(ckpt, items, thresholds) -> float:
    """The threshold with the most tokens per denoising pass among those with ≥ 98% exact answers (ties:
    the highest threshold), from the core sampler at temperature 0."""
    from bd3_plugin.sampling.config import SamplerConfig
    from bd3_plugin.tinyworld.copy_eval import solve

    scores = {}
    for th in thresholds:
        progress(f"core sampler, threshold {th}")
        scores[th] = solve(ckpt, items, SamplerConfig(algorithm="threshold", temperature=0, threshold=th))
        s = scores[th]
        print(f"sweep: threshold {th:g}: correct {100 * s.correct:.1f}%, {s.tokens_per_pass:.2f} answer tokens "
              f"per denoising pass ({len(items)} items, core sampler)")
    good = [th for th in thresholds if scores[th].correct >= MIN_CORRECT]
    if not good:
        raise SystemExit(f"bench_vllm.py: no threshold in {list(thresholds)} keeps {MIN_CORRECT:.0%} exact answers")
    return max(good, key=lambda th: (round(scores[th].tokens_per_pass, 6), th))


def copy_part(args, work: str) -> None:
    from bd3_plugin.core.checkpoint import load_checkpoint
    from bd3_plugin.sampling.config import SamplerConfig
    from bd3_plugin.tinyworld.copy_eval import solve
    from bd3_plugin.tinyworld.copying import CopySource
    from bd3_plugin.tinyworld.data import copy_checkpoint_path, read_copy_heldout
    from bd3_plugin.tinyworld.grammar import EOS

    path = copy_checkpoint_path(16)
    ckpt = load_checkpoint(path)
    source = CopySource()
    heldout = read_copy_heldout()
    items = heldout[: args.requests]
    answer = source.config.answer_tokens
    print(f"\n## copy task: {path.name}, threshold sampler, temperature 0; {len(items)} held-out items, "
          f"max_tokens {answer} for both models (the answer: {answer - 1} words + EOS)")
    th = args.threshold if args.threshold is not None else choose_threshold(ckpt, heldout[: args.sweep_items],
                                                                           args.sweep)
    core = solve(ckpt, items, SamplerConfig(algorithm="threshold", temperature=0, threshold=th))
    print(f"threshold {th:g}: core sampler on the bench's items: correct {100 * core.correct:.1f}%, "
          f"{core.tokens_per_pass:.2f} answer tokens per denoising pass")
    prompts = [[ckpt.eos_id] + ckpt.encode(item.prompt) for item in items]

    def correct(run) -> float:
        hits = 0
        for item, (ids, reason) in zip(items, run.outputs):
            words = ckpt.tokenizer.convert_ids_to_tokens(list(ids))
            if reason == "stop" and ids and ids[-1] == ckpt.eos_id:
                words[-1] = EOS
            hits += source.is_correct(item.prompt.split(), words)
        return hits / len(items)

    bd3 = engine(str(path), prompts, args, temperature=0.0, max_tokens=answer,
                 extra_args={"algorithm": "threshold", "threshold": th})
    ar = engine(same_shape_llama(ckpt, work), prompts, args, temperature=0.0, max_tokens=answer, ignore_eos=True)
    print("BD3 stops at the answer's EOS (returned and counted), the AR model ignores EOS; tokens = generated "
          "tokens returned; tokens/pass = per batched model pass, prefill and commit passes included")
    table(bd3, ar, correct)


# ---- grammar ----------------------------------------------------------------------------------------
def core_batch1(ckpt, prompts, tokens: int) -> tuple[float, float]:
    import time

    from bd3_plugin.sampling.config import SamplerConfig

    from bd3_plugin.sampling.generate import generate
    from bd3_plugin.core.generators import seeded_generators

    cfg = SamplerConfig(algorithm="first_hitting", max_new_tokens=tokens, stop_at_eos=False)
    generate(ckpt.model, prompts[:1], cfg, seeded_generators([0]))  # warm-up
    start = time.perf_counter()
    made = 0
    passes = 0
    for i, p in enumerate(prompts[:8]):
        out = generate(ckpt.model, [p], cfg, seeded_generators([i]))
        made += len(out.generations[0].tokens)
        passes += out.forward_passes
    return made / (time.perf_counter() - start), passes / made


def grammar_part(args, work: str) -> None:
    from bd3_plugin.core.checkpoint import load_checkpoint
    from bd3_plugin.tinyworld.data import checkpoint_path

    path = checkpoint_path(args.grammar_block_size)
    ckpt = load_checkpoint(path)
    texts = ["<eos> the old cow", "<eos>", "<eos> some ships run . a", "<eos> many owls"]
    prompts = [ckpt.encode(texts[i % 4]) for i in range(args.requests)]
    print(f"\n## grammar: {path.name}, first-hitting, temperature 1; {args.requests} requests x "
          f"{args.tokens} new tokens, EOS ignored")
    progress("core sampler, batch 1")
    tps, ppt = core_batch1(ckpt, prompts, args.tokens)
    print(f"core sampler, batch 1: {tps:.1f} tok/s, {ppt:.3f} model passes per generated token")
    params = dict(temperature=1.0, max_tokens=args.tokens, ignore_eos=True)
    bd3 = engine(str(path), prompts, args, **params, extra_args={"algorithm": "first_hitting"})
    ar = engine(same_shape_llama(ckpt, work), prompts, args, **params)
    one = next((b for b in bd3 if b.concurrency == 1), None)
    if one is not None:  # one request at a time: the runner's passes are that request's passes
        print(f"vLLM BD3, concurrency 1: {one.passes / one.tokens:.3f} model passes per generated token "
              f"(prefill, denoising and commit passes; {args.grammar_block_size} denoising passes per block)")
    table(bd3, ar)


# ---- released shape ---------------------------------------------------------------------------------
def released_part(args, work: str) -> None:
    from bd3_plugin.core.checkpoint import load_checkpoint
    from bd3_plugin.tinyworld.data import checkpoint_path
    from position_arithmetic import dit_cost, first_hitting_positions, llama_cost, predicted_ratio

    size = args.released_block_size
    tokens = args.released_tokens
    tokenizer = load_checkpoint(checkpoint_path(4)).tokenizer  # encodes the prompts; nothing is detokenized
    texts = ["<eos> the old cow", "<eos> some ships run . a", "<eos> many owls", "<eos> a farmer sees"]
    count = args.released_waves * max(args.concurrency)
    prompts = [tokenizer.encode(texts[i % 4], add_special_tokens=False) for i in range(count)]
    params = dict(temperature=1.0, max_tokens=tokens, ignore_eos=True)
    progress("writing the released-shape BD3 and Llama checkpoints")
    cfg = make_released_bd3(size, tokenizer, f"{work}/released-bd3")
    make_llama(cfg, tokenizer, f"{work}/released-llama")
    print(f"\n## released shape: random weights, 12 x 768, 12 heads, vocabulary 50,258, L' = {size}; "
          f"first-hitting, temperature 1; {args.released_waves} waves of requests per concurrency level, "
          f"{tokens} new tokens each, EOS ignored")
    waves = args.released_waves
    bd3 = engine(f"{work}/released-bd3", prompts, args, waves, **params, extra_args={"algorithm": "first_hitting"})
    ar = engine(f"{work}/released-llama", prompts, args, waves, **params)
    table(bd3, ar)
    dit = dit_cost(cfg)
    llama = llama_cost(cfg)
    print(f"multiply-accumulates per position: BD3 layers {dit.layers / 1e6:.1f} M, Llama layers "
          f"{llama.layers / 1e6:.1f} M, output layer {dit.output / 1e6:.1f} M (both)")
    print("| concurrency | BD3 layer pos/token | BD3 output pos/token | AR layer pos/token | AR output pos/token "
          "| predicted BD3/AR | measured BD3/AR | measured (CPU time) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b, a in zip(bd3, ar):
        bp = (b.per_token(b.layer_positions), b.per_token(b.logit_positions))
        ap = (a.per_token(a.layer_positions), a.per_token(a.logit_positions))
        print(f"| {b.concurrency} | {bp[0]:.2f} | {bp[1]:.2f} | {ap[0]:.2f} | {ap[1]:.2f} | "
              f"{predicted_ratio(dit, bp, llama, ap):.2f}x | {b.tokens_per_s / a.tokens_per_s:.2f}x | "
              f"{b.tokens_per_cpu_s / a.tokens_per_cpu_s:.2f}x |")
    print("measured positions include the prompts' prefill; first-hitting at L' = {0}, prompts excluded, "
          "against AR's 1 and 1:".format(size))
    for fused, name in ((False, "separate commit pass, logits of the whole block"),
                        (True, "commit fused into the next block's first pass, logits only where read")):
        pos = first_hitting_positions(size, fused)
        print(f"  {name}: layers {pos[0]:.2f}, output {pos[1]:.2f} positions per token -> predicted BD3/AR "
              f"{predicted_ratio(dit, pos, llama, (1.0, 1.0)):.2f}x")


def main() -> None:
    args = parse_args(sys.argv[1:])
    import torch

    torch.set_num_threads(args.threads)  # before the first engine: vLLM's CPU worker then forbids it

    levels = ", ".join(map(str, args.concurrency))
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, vllm-cpu 0.32.0, float32, "
          f"{torch.get_num_threads()} threads, max_model_len {MAX_MODEL_LEN}; concurrency {levels} (released: "
          f"{', '.join(map(str, args.released_concurrency))}); best of {args.repeats} per level; requests sent in "
          f"waves of the concurrency; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as work:  # the random-weight checkpoints
        for part in PARTS:
            if args.only in (None, part):
                {"copy": copy_part, "grammar": grammar_part, "released": released_part}[part](
                    replace(args, concurrency=args.released_concurrency) if part == "released" else args, work)


if __name__ == "__main__":
    main()
