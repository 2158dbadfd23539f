"""Checks of the core on an accelerator, each printing what it measured; `bench/gpu_check.sh` runs them.

    python bench/device_checks.py memory [--device cuda]   # one block step's peak against the README's formula
    python bench/device_checks.py parity [--device cuda]   # float32 core on the device against the core on CPU

`memory`: the sampler step of one all-mask block batch at the released shape (V = 50,258, L' = 4), measured
with `torch.cuda.max_memory_allocated` on CUDA (torch's CPU memory profiler on CPU), printed as measured /
formula c' · m · V + b · V (vllm_backend/README.md, "Memory of a block step"). `parity`: the bundled tiny-bd3-L4
checkpoint in float32 on the device and on CPU, same CPU generators: max |logit difference| of one forward,
of the NELBO, and whether generated tokens are equal; on CUDA with TF32 off (what the vLLM GPU worker sets for
float32) and, for contrast, on. `--device cpu` runs either as a dry run of the script on CPU.
Exits non-zero when a measurement is off the formula by more than 5% or float32 tokens differ with TF32 off.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

import torch

from sampler_memory import SETTINGS, formula, reads, step_peak

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.likelihood.nelbo import nelbo_terms
from bd3_plugin.sampling import SamplerConfig
from bd3_plugin.sampling.generate import generate
from bd3_plugin.tinyworld.data import checkpoint_path

RELEASED_VOCAB = 50258


def memory(device: str, rows: int, block_size: int) -> bool:
    print(f"rows {rows}, L' {block_size}, V {RELEASED_VOCAB}, device {device}; measured / formula (c' · m · V + b · V)")
    ok = True
    for algorithm in ("first_hitting", "threshold"):
        for setting in SETTINGS:
            config = SamplerConfig(algorithm=algorithm, **setting)
            peak, read = step_peak(config, rows, block_size, RELEASED_VOCAB, device)
            assert read == reads(algorithm, setting["temperature"], rows, block_size)
            expected = formula(n=read, vocab=RELEASED_VOCAB, per_row=read // rows, **setting)
            ratio = peak / expected
            ok &= abs(ratio - 1) <= 0.05
            print(f"{algorithm:14s} {str(setting):48s} n {read:3d}  measured {peak:>12,d} B  "
                  f"formula {expected:>12,d} B  ratio {ratio:6.4f}")
    return ok


@contextmanager
def tf32(enabled: bool):
    """TF32 in cuBLAS/cuDNN matmuls and convolutions, as torch's global switches set it; restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def core_outputs(model, ids: torch.Tensor, prompts: list[list[int]]) -> dict:
    """One forward's logits, the NELBO terms and generated tokens at temperature 0 and 1 (CPU generators)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(ids.to(device)).cpu()
        nelbo = nelbo_terms(model, ids.to(device), seeded_generators(range(len(ids)))).cpu()
        tokens = {}
        for temperature in (0.0, 1.0):
            config = SamplerConfig(algorithm="first_hitting", max_new_tokens=32, temperature=temperature,
                                   stop_at_eos=False)
            out = generate(model, prompts, config, seeded_generators(range(len(prompts))))
            tokens[temperature] = [g.tokens for g in out.generations]
    return {"logits": logits, "nelbo": nelbo, "tokens": tokens}


def parity(device: str) -> bool:
    checkpoint = load_checkpoint(checkpoint_path(4))
    cfg = checkpoint.model.config
    ids = torch.randint(0, cfg.vocab_size - 1, (4, cfg.model_length), generator=torch.Generator().manual_seed(0))
    prompts = [checkpoint.encode("<eos> the old cow"), checkpoint.encode("<eos> a")]
    reference = core_outputs(checkpoint.model, ids, prompts)
    on_device = checkpoint.model.to(device)
    modes = [False, True] if torch.device(device).type == "cuda" else [None]
    ok = True
    for mode in modes:
        with tf32(bool(mode)):
            got = core_outputs(on_device, ids, prompts)
        name = "cpu dry run (no TF32 on CPU)" if mode is None else f"TF32 {'on' if mode else 'off'}"
        logit_diff = (got["logits"] - reference["logits"]).abs().max().item()
        nelbo_diff = (got["nelbo"] - reference["nelbo"]).abs().max().item()
        equal = {t: got["tokens"][t] == reference["tokens"][t] for t in (0.0, 1.0)}
        print(f"{device} vs cpu, float32, {name}: max |logit diff| {logit_diff:.3e}, max |nelbo diff| "
              f"{nelbo_diff:.3e}, tokens equal at temperature 0: {equal[0.0]}, at temperature 1: {equal[1.0]}")
        if not mode:
            ok &= all(equal.values())
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["memory", "parity"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=4, help="memory: rows of the block batch")
    parser.add_argument("--block-size", type=int, default=4, help="memory: L'")
    args = parser.parse_args()
    ok = memory(args.device, args.rows, args.block_size) if args.check == "memory" else parity(args.device)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
