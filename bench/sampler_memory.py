"""Peak memory of one sampler step (`Sampler.read` then `Sampler.step` on logits already computed), measured
on CPU with torch's memory profiler: the bytes the step allocates above what it started with, at their most.
Deterministic (allocation sizes, not timings), so `tests/test_sampler_memory.py` checks the README's formula
with it. Run: `python bench/sampler_memory.py` (prints bytes per slot of the largest chunk per vocabulary
entry; `--chunk-entries` sets the samplers' CHUNK_ENTRIES for the run)."""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bd3_plugin.sampling import SamplerConfig
from bd3_plugin.sampling import samplers
from bd3_plugin.sampling.registry import sampler_for


def peak_bytes(fn) -> int:
    """The most bytes live at once among those `fn` allocates on CPU (freed ones count until freed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every allocation on this thread, in program order
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        torch.set_num_threads(threads)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = 0
    peak = 0
    for event in events:
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(fn) -> int:
    """The same on the current CUDA device, from its caching allocator's statistics."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def bytes_per_entry(temperature: float, top_k: int = 0, top_p: float = 1.0) -> int:
    """The formula's c': bytes per slot per vocabulary entry live at once at the peak of a chunk. Temperature
    0, or above it with no filter: two float64 (m, V) tensors (the SUBS logits and their softmax; then the
    probabilities and the uniforms, which become the noise in place). Top-k: its sort's values and int64
    order beside the probabilities (24). Top-p, with or without top-k: the sort, its cumulative sum and a
    bool mask beside the distribution it filters (33); top-k's output replaces the softmax before it."""
    if temperature == 0:
        return 16
    if top_p < 1.0:
        return 33
    return 24 if top_k else 16


def row_buffer(temperature: float, top_k: int = 0, top_p: float = 1.0) -> int:
    """Bytes per vocabulary entry the formula adds once per chunk: a sort's one-row float64 buffer, at the
    peak only for top-k alone (top-p's cumulative sum outweighs it)."""
    return 8 if temperature > 0 and top_k and top_p >= 1.0 else 0


def chunk_slots(n: int, vocab: int, temperature: float, per_row: int) -> int:
    """m, the slots of a step's largest chunk, when every row reads `per_row` of its n slots: at most
    max(1, CHUNK_ENTRIES // V) slots, whole rows only above temperature 0 (a row's draw is never split)."""
    limit = max(1, samplers.CHUNK_ENTRIES // vocab)
    if temperature == 0 or per_row == 0:
        return min(n, limit)
    return min(n, max(per_row, limit // per_row * per_row))


def formula(temperature: float, n: int, vocab: int, per_row: int, top_k: int = 0, top_p: float = 1.0) -> int:
    """The README's peak of one sampler step: c' · m · V + b · V (m = `chunk_slots`, b = `row_buffer`)."""
    m = chunk_slots(n, vocab, temperature, per_row)
    return (bytes_per_entry(temperature, top_k, top_p) * m + row_buffer(temperature, top_k, top_p)) * vocab


def reads(algorithm: str, temperature: float, rows: int, block_size: int) -> int:
    """n for an all-mask block: first-hitting above temperature 0 reads one slot per row, the rest all."""
    return rows if algorithm == "first_hitting" and temperature > 0 else rows * block_size


def step_peak(config: SamplerConfig, rows: int, block_size: int, vocab: int, device: str = "cpu"
              ) -> tuple[int, int]:
    """(peak bytes, slots read) of the first step of an all-mask block of `rows` × `block_size` slots at the
    grid's last level pair (DDPM then reveals every masked slot: its worst case), with the logits and the
    rows' generators on `device`."""
    mask_id = vocab - 1
    sampler = sampler_for(config, mask_id)
    masked = torch.ones(rows, block_size, dtype=torch.bool, device=device)
    logits = torch.randn(rows, block_size, vocab, generator=torch.Generator().manual_seed(0)).to(device)  # (B, L', V)

    def generators() -> list[torch.Generator]:
        return [torch.Generator(device).manual_seed(r) for r in range(rows)]

    read = int(sampler.read(masked, generators()).sum())
    gens = generators()

    def one_step() -> None:
        chosen = sampler.read(masked, gens)
        sampler.step(logits, masked, chosen, gens, block_size - 1, 1 / block_size, 0.0)

    measure = cuda_peak_bytes if torch.device(device).type == "cuda" else peak_bytes
    return measure(one_step), read


SETTINGS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, top_k=50),
            dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, top_k=50, top_p=0.9)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50258)
    parser.add_argument("--chunk-entries", type=int, default=samplers.CHUNK_ENTRIES)
    args = parser.parse_args()
    samplers.CHUNK_ENTRIES = args.chunk_entries
    print(f"rows {args.rows}, L' {args.block_size}, V {args.vocab}, CHUNK_ENTRIES {args.chunk_entries}; "
          f"bytes per slot of the largest chunk (m) per vocabulary entry")
    for algorithm in ("first_hitting", "ddpm", "threshold"):
        for setting in SETTINGS:
            config = SamplerConfig(algorithm=algorithm, **setting)
            peak, read = step_peak(config, args.rows, args.block_size, args.vocab)
            m = chunk_slots(read, args.vocab, config.temperature, read // args.rows)
            print(f"{algorithm:14s} {str(setting):48s} slots read {read:3d}  m {m:3d}  peak {peak:>12,d} B  "
                  f"{peak / (m * args.vocab):7.3f}  formula {formula(n=read, vocab=args.vocab, per_row=read // args.rows, **setting):>12,d} B")


if __name__ == "__main__":
    main()
