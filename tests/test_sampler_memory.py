"""The sampler's memory per step against the formula in vllm_backend/README.md ("Memory of a block step"):
peak bytes = c · n · V, n the slots whose distribution the step computes, V the vocabulary, c by
temperature and filters. Measured with torch's CPU memory profiler (allocation sizes, deterministic) at two
sizes of n and V, so that a term in n·V with another coefficient, or one not linear in n·V, shows."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from sampler_memory import SETTINGS, bytes_per_entry, peak_bytes, reads, step_peak  # noqa: E402

from bd3_plugin.sampling import SamplerConfig  # noqa: E402

README = Path(__file__).resolve().parent.parent / "vllm_backend" / "README.md"


SIZES = [(2, 4, 1000), (4, 8, 3000)]  # (rows, L', V): n·V from 2,000 to 96,000


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm", "threshold"])
def test_one_sampler_step_peaks_at_the_readme_formula(algorithm, setting):
    c = bytes_per_entry(**setting)
    for rows, block_size, vocab in SIZES:
        peak, read = step_peak(SamplerConfig(algorithm=algorithm, **setting), rows, block_size, vocab)
        assert read == reads(algorithm, setting["temperature"], rows, block_size)
        # What is not per vocabulary entry (per-slot confidences, masks, tokens) stays under 64 B a slot.
        assert abs(peak - c * read * vocab) < 64 * rows * block_size, (rows, block_size, vocab, peak / (read * vocab))


def test_the_measurement_sees_one_more_float64_copy():
    """Negative control: a step that also holds a float64 copy of its (n, V) logits measures 8 B more per
    entry, so a sampler change that adds one fails the test above."""
    config = SamplerConfig(algorithm="threshold", temperature=1.0)
    rows, block_size, vocab = SIZES[0]
    base, read = step_peak(config, rows, block_size, vocab)
    logits = torch.randn(rows, block_size, vocab)

    def step_and_copy() -> None:
        held = logits.double()  # (B, L', V) float64, live over the step
        step_peak_inside()
        del held

    def step_peak_inside() -> None:
        from bd3_plugin.sampling.registry import sampler_for

        masked = torch.ones(rows, block_size, dtype=torch.bool)
        gens = [torch.Generator().manual_seed(r) for r in range(rows)]
        sampler_for(config, vocab - 1).step(logits, masked, masked, gens, block_size - 1, 1 / block_size, 0.0)

    assert abs(peak_bytes(step_peak_inside) - base) < 64 * rows * block_size
    assert abs(peak_bytes(step_and_copy) - base - 8 * read * vocab) < 64 * rows * block_size


def test_the_readme_states_the_formula_the_test_checks():
    text = README.read_text()
    section = text[text.index("## Memory of a block step"):]
    section = section[: section.index("\n## ", 3)] if "\n## " in section[3:] else section
    rows = dict(re.findall(r"^\| (temperature [^|]+?) \| (\d+) \|", section, flags=re.M))
    assert rows == {"temperature 0 (any filter)": "16", "temperature > 0, no filter": "32",
                    "temperature > 0, top-k": "41", "temperature > 0, top-p (with or without top-k)": "50"}
    assert bytes_per_entry(0.0, 50, 0.9) == 16 and bytes_per_entry(1.0) == 32
    assert bytes_per_entry(1.0, top_k=50) == 41 and bytes_per_entry(1.0, top_p=0.9) == 50
    assert bytes_per_entry(1.0, top_k=50, top_p=0.9) == 50


# ---- the reservation in vLLM's profiling pass ----------------------------------------------------------
class _VllmRunner:
    """What the mixin's `_dummy_sampler_run` reaches of vLLM's runner: its own sampler run (stubbed)."""

    def _dummy_sampler_run(self, hidden_states):
        return "vllm's sampler output"


@pytest.mark.parametrize("max_num_seqs, block_size, budget, rows", [
    (2, 4, 8192, 2), (6, 4, 8192, 6), (2, 16, 8192, 2), (6, 16, 64, 4),  # the last: the token budget caps
])
def test_the_profiling_pass_reserves_the_formulas_worst_block_step(max_num_seqs, block_size, budget, rows):
    """The BD3 runner's `_dummy_sampler_run` peaks at (4 + 50) · rows · L' · V: the pass's float32 logits
    and the largest c, for as many all-mask blocks as one step decodes (max_num_seqs, unless the token
    budget holds fewer blocks of L')."""
    from types import SimpleNamespace

    from vllm_backend.worker.runner import BD3RunnerMixin

    class Runner(BD3RunnerMixin, _VllmRunner):
        pass

    vocab, width = 1000, 16
    head = torch.nn.Linear(width, vocab, bias=False)
    runner = object.__new__(Runner)  # only the attributes the profiling hook reads
    runner.bd3 = SimpleNamespace(block_size=block_size, mask_id=vocab - 1)
    runner.scheduler_config = SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    runner.model = SimpleNamespace(compute_logits=head)
    hidden = torch.randn(max_num_seqs, width)
    out = []

    def profile() -> None:
        out.append(runner._dummy_sampler_run(hidden))

    with torch.no_grad():
        peak = peak_bytes(profile)
    assert out == ["vllm's sampler output"]
    slots = rows * block_size
    assert abs(peak - (4 + bytes_per_entry(1.0, top_p=0.9)) * slots * vocab) < 64 * slots, peak / (slots * vocab)


@pytest.mark.engine
def test_vllms_profiling_pass_runs_on_the_bd3_cpu_runner_and_reserves_a_block_step(engines):
    """vLLM's `profile_run` (`_dummy_run`, then `_dummy_sampler_run`) on a built engine's BD3 CPU runner: it
    runs, reaches the worst block step once for max_num_seqs blocks of L', and leaves the engine's tokens
    as they were."""
    from bd3_plugin.tinyworld.data import checkpoint_path

    spec = {"checkpoint": str(checkpoint_path(4)), "engine": {"max_model_len": 128, "max_num_seqs": 3},
            "prompt": [1, 5, 9, 13, 17], "max_tokens": 8}
    out = engines.run("profile", spec)  # the session's engine process (tests/vllm_profile_worker.py)
    assert out["runner"] == "BD3CPUModelRunner"
    assert out["steps"] == [{"rows": 3, "block_size": 4, "width": out["hidden"]}]
    assert out["before"] == out["after"] and len(out["before"]) == 8
