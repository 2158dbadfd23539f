"""Seed -> tokens per device: per-row generators live on the model's device (vllm_backend/README.md,
"Randomness and host syncs"). On CPU the streams, hence the tokens, are the CPU generator's as before."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.core.generators import seeded_generators
from bd3_plugin.sampling import SamplerConfig
from bd3_plugin.sampling.generate import generate
from bd3_plugin.tinyworld.data import checkpoint_path


@pytest.fixture
def asked_devices(monkeypatch):
    """The devices code asks torch.Generator for; each gets a CPU generator, so no CUDA is needed."""
    asked = []
    real = torch.Generator

    def generator(device="cpu"):
        asked.append(torch.device(device))
        return real()

    monkeypatch.setattr(torch, "Generator", generator)
    return asked


def test_seeded_generators_on_cpu_keep_the_cpu_stream():
    for got, seed in zip(seeded_generators([3, 4], "cpu"), [3, 4]):
        assert got.device == torch.device("cpu")
        assert torch.equal(got.get_state(), torch.Generator().manual_seed(seed).get_state())


def test_seeded_generators_are_made_on_the_device_asked_for(asked_devices):
    seeded_generators([1, 2], "cuda:1")
    assert asked_devices == [torch.device("cuda", 1)] * 2


def test_the_runner_makes_a_requests_generator_on_the_models_device(request):
    from vllm_backend.worker.runner import BD3RunnerMixin

    asked_devices = request.getfixturevalue("asked_devices")  # after the import: vLLM's annotations read torch

    runner = SimpleNamespace(device=torch.device("cuda", 0), _generators={},
                             requests={"r": SimpleNamespace(sampling_params=SimpleNamespace(seed=7))})
    gen = BD3RunnerMixin._generator(runner, "r")
    assert asked_devices == [torch.device("cuda", 0)]
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(7).get_state())  # the seed, not a drawn one
    assert BD3RunnerMixin._generator(runner, "r") is gen  # one generator for the request's whole life


def test_a_drawn_seed_replays_on_the_models_device():
    """Without generators `generate` draws seeds and makes the generators on the model's device; a fresh
    generator there with the reported seed gives the same tokens."""
    ckpt = load_checkpoint(checkpoint_path(4))
    config = SamplerConfig(algorithm="first_hitting", max_new_tokens=12, stop_at_eos=False)
    prompt = ckpt.encode("<eos> the old cow")
    first = generate(ckpt.model, [prompt], config, record=True)
    traj = first.trajectories[0]
    assert traj.seed_drawn and traj.seed_replays
    again = generate(ckpt.model, [prompt], config, seeded_generators([traj.seed], ckpt.model.device))
    assert again.generations[0].tokens == first.generations[0].tokens
