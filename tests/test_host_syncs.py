"""Host syncs of the denoising loop: the reads of device values that make the host wait for the device on
CUDA, counted on CPU at the points where they happen. A read of a scalar (`bool`, `int`, `.item()`), a copy to
the host (`.tolist()`, `.cpu()`, `.numpy()`), `nonzero` and indexing or assigning through a boolean mask
(which runs `nonzero`) each count one. vllm_backend/README.md ("Randomness and host syncs") states the count."""
from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bd3_plugin.sampling import SamplerConfig
from bd3_plugin.sampling.denoise import denoise_block
from bd3_plugin.sampling.registry import sampler_for

_WAITS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}
_MASK_INDEXING = {"aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default"}


class HostSyncs(TorchDispatchMode):
    """Counts the operators that wait for the device on CUDA; `.tolist()`, `.cpu()` and `.numpy()` dispatch
    nothing on CPU, so the test patches them to count here too."""

    def __init__(self) -> None:
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in _WAITS:
            self.count[name] += 1
        elif name in _MASK_INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.count[name + " (boolean mask)"] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> int:
        return sum(self.count.values())


@pytest.fixture
def syncs(monkeypatch):
    counter = HostSyncs()
    for method in ("tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            counter.count[_method] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    return counter


def test_the_counter_sees_each_kind_of_host_read(syncs):
    """Negative control: each form of read the loop could contain is counted once."""
    x = torch.randn(3, 4)
    mask = x > 0
    reads = [lambda: bool(mask.any()), lambda: int(mask.sum()), lambda: x[mask], lambda: x.__setitem__(mask, 0.0),
             lambda: mask.nonzero(), lambda: x.tolist(), lambda: x.cpu()]
    for n, read in enumerate(reads, start=1):
        with syncs:
            read()
        assert syncs.total() == n, (n, syncs.count)
    with syncs:
        torch.where(mask, x, 0.0).sum(dim=1)  # device-side only
    assert syncs.total() == len(reads)


# Per step of the loop, the forward excluded: 1 read of the loop's decisions, plus the sampler's own.
# Temperature 0 (every sampler): the greedy positions' loop bound, the logits at the masked slots, and the
# scatter of confidences and tokens back to (B, L'): 4. Above 0: first-hitting reads per-row counts twice
# (its position draw and its token draws), scatters the position draw and the tokens, and gathers the
# logits read: 5; threshold: the gather, the counts, two scatters and the fallback's loop bound: 5; DDPM:
# the counts twice, the reveal draw's scatter, the gather and the tokens' scatter: 5.
PER_STEP = {0.0: 1 + 4, 1.0: 1 + 5}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("algorithm, rows", [("first_hitting", 3), ("threshold", 3), ("ddpm", 1)])
def test_host_syncs_per_step_of_the_denoising_loop(syncs, monkeypatch, algorithm, temperature, rows):
    """DDPM above temperature 0 at one row: with several, a step where some rows keep their logits adds
    the two boolean-mask copies of those rows."""
    size, vocab = 4, 50
    mask_id = vocab - 1
    config = SamplerConfig(algorithm=algorithm, temperature=temperature)
    logits = torch.randn(rows, size, vocab, generator=torch.Generator().manual_seed(0))  # (B, L', V)
    kind = type(sampler_for(config, mask_id))
    steps = []
    step = kind.step

    def counted_step(self, *args, **kwargs):
        steps.append(1)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(kind, "step", counted_step)
    block = torch.full((rows, size), mask_id)
    gens = [torch.Generator().manual_seed(r) for r in range(rows)]
    with syncs:
        denoise_block(block, lambda b, read: logits, config, gens, mask_id)
    assert (block != mask_id).all()
    # + 1: the read that finds no mask left and ends the loop
    assert syncs.total() == len(steps) * PER_STEP[temperature] + 1, (len(steps), syncs.count)


def test_the_runner_gathers_and_scatters_the_output_layer_with_one_sync(syncs):
    """The runner's forward runs the output layer only on the slots read: one `nonzero` for its gather and
    its scatter, and the same logits as indexing by the boolean mask (two syncs) gives."""
    pytest.importorskip("vllm")
    from vllm_backend.worker.runner import scatter_read_logits

    layer = torch.nn.Linear(8, 11)
    hidden = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    read = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad(), syncs:
        logits = scatter_read_logits(layer, hidden, read)
    assert syncs.total() == 1, syncs.count
    with torch.no_grad():
        expected = torch.zeros(3, 4, 11)
        expected[read] = layer(hidden[read])
    assert torch.equal(logits, expected)


def test_the_readme_states_the_counts_the_test_checks():
    readme = (Path(__file__).resolve().parent.parent / "vllm_backend" / "README.md").read_text()
    section = readme.split("**Host syncs per denoising pass.**", 1)[1]
    stated = dict(re.findall(r"^\| temperature (0|> 0), any sampler \| \*\*(\d+)\*\*", section, re.M))
    assert stated == {"0": str(PER_STEP[0.0]), "> 0": str(PER_STEP[1.0])}
