"""Peak memory of one sampler step (`Sampler.read` then `Sampler.step` on logits already computed), measured
on CPU with torch's memory profiler: the bytes the step allocates above what it started with, at their most.
Deterministic (allocation sizes, not timings), so `tests/test_sampler_memory.py` checks the README's formula
with it. Run: `python bench/sampler_memory.py` (prints bytes per slot read per vocabulary entry)."""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bd3_plugin.sampling import SamplerConfig
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


def step_peak(config: SamplerConfig, rows: int, block_size: int, vocab: int) -> tuple[int, int]:
    """(peak bytes, slots read) of the first step of an all-mask block of `rows` × `block_size` slots at the
    grid's last level pair (DDPM then reveals every masked slot: its worst case)."""
    mask_id = vocab - 1
    sampler = sampler_for(config, mask_id)
    masked = torch.ones(rows, block_size, dtype=torch.bool)
    logits = torch.randn(rows, block_size, vocab, generator=torch.Generator().manual_seed(0))  # (B, L', V)

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(r) for r in range(rows)]

    read = int(sampler.read(masked, generators()).sum())
    gens = generators()

    def one_step() -> None:
        chosen = sampler.read(masked, gens)
        sampler.step(logits, masked, chosen, gens, block_size - 1, 1 / block_size, 0.0)

    return peak_bytes(one_step), read


SETTINGS = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, top_k=50),
            dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, top_k=50, top_p=0.9)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50258)
    args = parser.parse_args()
    print(f"rows {args.rows}, L' {args.block_size}, V {args.vocab}; bytes per slot read per vocabulary entry")
    for algorithm in ("first_hitting", "ddpm", "threshold"):
        for setting in SETTINGS:
            config = SamplerConfig(algorithm=algorithm, **setting)
            peak, read = step_peak(config, args.rows, args.block_size, args.vocab)
            print(f"{algorithm:14s} {str(setting):48s} slots read {read:3d}  peak {peak:>12,d} B  "
                  f"{peak / (read * args.vocab):7.3f}")


if __name__ == "__main__":
    main()
