"""The sampler's memory per step against the formula in vllm_backend/README.md ("Memory of a block step"):
peak bytes = c' · m · V + b · V, m the slots of the step's largest chunk (at most CHUNK_ENTRIES // V of the
n slots whose distribution the step computes), V the vocabulary, c' and b by temperature and filters.
Measured with torch's CPU memory profiler (allocation sizes, deterministic) at two sizes of n and V, one
whole in a chunk and one over several, so that a term with another coefficient, or one in n · V where the
formula has m · V, shows."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from sampler_memory import (SETTINGS, bytes_per_entry, chunk_slots, formula, peak_bytes, reads,  # noqa: E402
    row_buffer, step_peak)

from bd3_plugin.sampling import SamplerConfig, samplers  # noqa: E402

README = Path(__file__).resolve().parent.parent / "vllm_backend" / "README.md"

# (rows, L', V, CHUNK_ENTRIES): n·V of 8,000 in one chunk; n of 160 slots (40 for first-hitting above 0) in
# chunks of 32.
SIZES = [(2, 4, 1000, samplers.CHUNK_ENTRIES), (40, 4, 1000, 32_000)]
PER_SLOT = 96  # bytes per slot of the block that are not per vocabulary entry: masks, indices, tokens, confidences


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm", "threshold"])
def test_one_sampler_step_peaks_at_the_readme_formula(monkeypatch, algorithm, setting):
    for rows, block_size, vocab, entries in SIZES:
        monkeypatch.setattr(samplers, "CHUNK_ENTRIES", entries)
        peak, read = step_peak(SamplerConfig(algorithm=algorithm, **setting), rows, block_size, vocab)
        assert read == reads(algorithm, setting["temperature"], rows, block_size)
        expected = formula(n=read, vocab=vocab, per_row=read // rows, **setting)
        assert 0 <= peak - expected < PER_SLOT * rows * block_size, (rows, vocab, peak, expected)


def test_chunks_hold_whole_rows_above_temperature_0(monkeypatch):
    """A row's draw is one call on its generator: chunks end at row boundaries, packing rows while they fit
    (a row longer than the limit alone); at temperature 0 any slot may end a chunk."""
    vocab = 100
    monkeypatch.setattr(samplers, "CHUNK_ENTRIES", 10 * vocab)  # 10 slots a chunk
    counts = [5, 4, 2, 13, 0, 2]
    chunks = samplers.proposal_chunks(counts, sum(counts), vocab)
    assert [list(c.rows) for c in chunks] == [[0, 1], [2], [3], [4, 5]]
    assert [(c.start, c.stop) for c in chunks] == [(0, 9), (9, 11), (11, 24), (24, 26)]
    greedy = samplers.proposal_chunks(None, 21, vocab)
    assert [(c.start, c.stop) for c in greedy] == [(0, 10), (10, 20), (20, 21)]
    assert chunk_slots(100, vocab, 1.0, 3) == 9  # whole rows of 3
    assert chunk_slots(100, vocab, 0.0, 3) == 10


def test_the_measurement_sees_one_more_float64_copy():
    """Negative control: a step that also holds a float64 copy of its (n, V) logits measures 8 B more per
    entry, so a sampler change that adds one fails the test above."""
    config = SamplerConfig(algorithm="threshold", temperature=1.0)
    rows = SIZES[0][0]
    block_size = SIZES[0][1]
    vocab = SIZES[0][2]
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

    assert abs(peak_bytes(step_peak_inside) - base) < PER_SLOT * rows * block_size
    assert abs(peak_bytes(step_and_copy) - base - 8 * read * vocab) < PER_SLOT * rows * block_size


def test_the_readme_states_the_formula_the_test_checks():
    text = README.read_text()
    section = text[text.index("## Memory of a block step"):]
    section = section[: section.index("\n## ", 3)] if "\n## " in section[3:] else section
    rows = {name: (int(c), int(b)) for name, c, b in
            re.findall(r"^\| (temperature [^|]+?) \| (\d+) \| (\d+) \|", section, flags=re.M)}
    settings = {"temperature 0 (any filter)": dict(temperature=0.0, top_k=50, top_p=0.9),
                "temperature > 0, no filter": dict(temperature=1.0),
                "temperature > 0, top-k": dict(temperature=1.0, top_k=50),
                "temperature > 0, top-p (with or without top-k)": dict(temperature=1.0, top_p=0.9)}
    assert rows == {name: (bytes_per_entry(**s), row_buffer(**s)) for name, s in settings.items()}
    assert bytes_per_entry(1.0, top_k=50, top_p=0.9) == bytes_per_entry(1.0, top_p=0.9)
    assert row_buffer(1.0, top_k=50, top_p=0.9) == 0
    stated = re.search(r"`CHUNK_ENTRIES` = 2\^(\d+)", section)
    assert stated and 1 << int(stated.group(1)) == samplers.CHUNK_ENTRIES


# ---- the reservation in vLLM's profiling pass ----------------------------------------------------------
class _VllmRunner:
    """What the mixin's `_dummy_sampler_run` reaches of vLLM's runner: its own sampler run (stubbed)."""

    def _dummy_sampler_run(self, hidden_states):
        return "vllm's sampler output"


@pytest.mark.parametrize("max_num_seqs, block_size, budget, rows, entries", [
    (2, 4, 8192, 2, None), (6, 4, 8192, 6, None), (2, 16, 8192, 2, None),
    (6, 16, 64, 4, None),  # the token budget caps the blocks
    (6, 16, 8192, 6, 32_000),  # the step's 96 slots in chunks of 32
])
def test_the_profiling_pass_reserves_the_formulas_worst_block_step(monkeypatch, max_num_seqs, block_size, budget,
                                                                   rows, entries):
    """The BD3 runner's `_dummy_sampler_run` peaks at 4 · rows · L' · V (the pass's float32 logits) plus the
    formula's step at the largest c' (top-p), for as many all-mask blocks as one step decodes (max_num_seqs,
    unless the token budget holds fewer blocks of L')."""
    from types import SimpleNamespace

    from vllm_backend.worker.runner import BD3RunnerMixin

    class Runner(BD3RunnerMixin, _VllmRunner):
        pass

    if entries is not None:
        monkeypatch.setattr(samplers, "CHUNK_ENTRIES", entries)
    vocab = 1000
    width = 16
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
    worst = max(formula(n=slots, vocab=vocab, per_row=block_size, **setting) for setting in SETTINGS)
    assert worst == formula(1.0, slots, vocab, block_size, top_p=0.9)  # the setting reserve.py runs
    expected = 4 * slots * vocab + worst
    assert 0 <= peak - expected < PER_SLOT * slots, (peak, expected)


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
