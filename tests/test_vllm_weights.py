"""Weight updates in a running vLLM engine against a fresh engine on the new checkpoint.

The engines run in the session's engine process (one engine per job, tests/vllm_weights_worker.py); the
server is the session's `bd3 serve`, put back on its checkpoint after the test.
The second checkpoint is tiny-bd3-L4 with every tensor perturbed by seeded noise, saved by the core.
"""
import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from bd3_plugin.core.checkpoint import WEIGHTS, CheckpointError, load_checkpoint, read_config, save_checkpoint
from bd3_plugin.tinyworld.data import checkpoint_path
from engines import L4_OWN_PROCESSES
from vllm_backend.worker.weights import check_source
from vllm_backend.server.weight_routes import parse_update_request

PROMPTS = ["<eos> the old cow", "<eos> some ships run . a", "<eos>"]
EXTRA = "backbone.extra.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """tiny-bd3-L4, a perturbed copy (same shapes, other weights), and bad sources made from the copy."""
    root = tmp_path_factory.mktemp("weights")
    ck = load_checkpoint(checkpoint_path(4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ck.model.parameters():
            p.add_(0.3 * p.std().nan_to_num(0.0) * torch.randn(p.shape, generator=gen))
    new = save_checkpoint(ck.model, root / "new", tokenizer=ck.tokenizer)
    state = load_file(str(new / WEIGHTS))
    drop, shrink = sorted(state)[:2]
    bad = {k: v for k, v in state.items() if k != drop} | {shrink: state[shrink][:1].clone(), EXTRA: torch.zeros(2)}
    save_file(bad, str(root / "bad.safetensors"))
    return {"old": checkpoint_path(4), "new": new, "bad": root / "bad.safetensors", "drop": drop,
            "shrink": shrink, "shrink_shape": tuple(state[shrink].shape),
            "prompts": [ck.encode(t) for t in PROMPTS]}


def run_engine(engines, mode, spec):
    env = {"OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if mode == "update-mp" else "0"}
    return engines.run("weights", spec | {"mode": mode}, env=env)


@pytest.fixture(scope="module")
def runs(engines, ckpts):
    paths = {"old": str(ckpts["old"]), "new": str(ckpts["new"]), "new_file": str(ckpts["new"] / WEIGHTS),
             "old_file": str(ckpts["old"] / WEIGHTS), "bad_file": str(ckpts["bad"]), "config": str(checkpoint_path(16)),
             "nowhere": str(ckpts["new"] / "x")}
    spec = {"checkpoint": str(ckpts["old"]), "prompts": ckpts["prompts"], "paths": paths, "drop": ckpts["drop"]}
    fresh = run_engine(engines, "fresh", spec | {"checkpoint": str(ckpts["new"])})
    updated = run_engine(engines, "update", spec | {"bad": ["bad_file", "new_file_broken", "config", "nowhere"],
                                           "good": ["new", "old_file_state", "new_file_state"]})
    return fresh, updated


@pytest.fixture(scope="module")
def runs_mp(engines, ckpts, runs):
    """The same through an engine in its own processes (worker extension; state dicts sent as one buffer)."""
    paths = {"new": str(ckpts["new"]), "new_file": str(ckpts["new"] / WEIGHTS), "old_file": str(ckpts["old"] / WEIGHTS)}
    spec = {"checkpoint": str(ckpts["old"]), "prompts": ckpts["prompts"], "paths": paths, "drop": ckpts["drop"]}
    # the engine test_vllm_traces.py also uses; the updates end on its own weights
    return run_engine(engines, "update-mp", spec | {"bad": ["new_file_broken"], "keep": L4_OWN_PROCESSES,
                                                    "good": ["new_file_state", "old_file_state"]})


def _names_every_bad_tensor(message, ckpts):
    assert "\n" not in message and message.count("checkpoint does not match the model") == 1, message
    assert f"missing tensors: {ckpts['drop']}" in message, message
    assert f"unexpected tensors: {EXTRA}" in message, message
    shape = ckpts["shrink_shape"]
    assert f"mis-shaped tensors: {ckpts['shrink']} {(1, *shape[1:])} != expected {shape}" in message, message


def test_check_source_before_any_engine(ckpts):
    running = read_config(checkpoint_path(4))
    check_source(ckpts["new"], running)
    check_source(load_file(str(ckpts["new"] / WEIGHTS)), running)
    with pytest.raises(CheckpointError) as err:
        check_source(ckpts["bad"], running)
    _names_every_bad_tensor(str(err.value), ckpts)
    with pytest.raises(CheckpointError, match="block_size 16 != 4"):
        check_source(checkpoint_path(16), running)  # same shapes, another block size
    with pytest.raises(CheckpointError, match="not tensors: backbone.x"):
        check_source({"backbone.x": [1.0]}, running)


def test_update_request_body_is_strict():
    assert parse_update_request(b'{"path": "/c", "version": "v1"}') == ("/c", "v1")
    for body, needle in [(b"[]", "JSON object"), (b"{", "JSON object"), (b'{"path": "/c"}', "version must be"),
                         (b'{"version": "v"}', "path must be"), (b'{"path": "/c", "version": "v", "pause": 1}',
                                                                 "unknown field")]:
        with pytest.raises(ValueError, match=needle):
            parse_update_request(body)


@pytest.mark.engine
def test_update_equals_a_fresh_engine_on_the_new_checkpoint(runs):
    fresh, updated = runs
    assert updated["new"] != updated["before"]  # the perturbation changes the tokens
    assert updated["new"] == fresh  # from a checkpoint folder: greedy and seeded, every prompt
    assert updated["new_file_state"] == fresh  # from an in-memory state dict
    assert updated["old_file_state"] == updated["before"]  # and back to the starting weights


@pytest.mark.engine
def test_bad_update_names_every_tensor_and_keeps_the_old_weights(runs, ckpts):
    _, updated = runs
    errors = updated["errors"]
    assert errors["bad_file"].startswith("CheckpointError: ")
    _names_every_bad_tensor(errors["bad_file"], ckpts)
    missing = f"CheckpointError: checkpoint does not match the model: missing tensors: {ckpts['drop']}"
    assert errors["new_file_broken"] == missing
    assert "block_size 16 != 4" in errors["config"]
    assert "neither a checkpoint folder nor a .safetensors file" in errors["nowhere"]
    assert errors["version"] == "ValueError: version must be a non-empty string, got ''"
    assert updated["after_bad"] == updated["before"]


@pytest.mark.engine
def test_version_labels(runs):
    _, updated = runs
    assert updated["versions"] == ["default", "default", "new", "old_file_state", "new_file_state"]


@pytest.mark.engine
def test_engine_in_other_processes(runs, runs_mp, ckpts):
    fresh, updated = runs
    assert runs_mp["before"] == updated["before"]
    missing = f"CheckpointError: checkpoint does not match the model: missing tensors: {ckpts['drop']}"
    assert runs_mp["errors"]["new_file_broken"] == missing and runs_mp["after_bad"] == updated["before"]
    assert runs_mp["new_file_state"] == fresh and runs_mp["old_file_state"] == updated["before"]
    assert runs_mp["versions"] == ["default", "default", "new_file_state", "old_file_state"]


def served_tokens(server, prompts):
    """The worker's cases over HTTP, token ids as lists: [case][prompt]."""
    from vllm_weights_worker import CASES, MAX_TOKENS

    out = []
    for case in CASES:
        row = []
        for prompt in prompts:
            body = {"model": str(checkpoint_path(4)), "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True,
                    "return_token_ids": True, **case}
            r = requests.post(f"{server.base}/v1/completions", json=body, headers=server.headers, timeout=120)
            assert r.status_code == 200, r.text
            row.append(r.json()["choices"][0]["token_ids"])
        out.append(row)
    return out


@pytest.fixture
def server(bd3_server):
    """The session's server; whatever the test did, it ends on tiny-bd3-L4's weights, labelled "default"."""
    from vllm_backend.server.weight_routes import server_weight_version, update_server_weights

    yield bd3_server
    if server_weight_version(bd3_server.base) != "default":
        update_server_weights(bd3_server.base, checkpoint_path(4), "default")


@pytest.mark.engine
@pytest.mark.server
def test_server_update_route(server, runs, ckpts):
    from vllm_backend.worker.weights import WeightUpdateError
    from vllm_backend.server.weight_routes import server_weight_version, update_server_weights

    fresh, updated = runs
    prompts, base = ckpts["prompts"], server.base
    assert server_weight_version(base) == "default"
    assert served_tokens(server, prompts) == updated["before"]  # the offline engine's tokens on tiny-bd3-L4

    with pytest.raises(WeightUpdateError) as err:
        update_server_weights(base, ckpts["bad"], "bad")
    assert str(err.value).startswith("400: ")
    _names_every_bad_tensor(str(err.value), ckpts)
    r = requests.post(f"{base}/bd3/update_weights", json={"path": str(ckpts["new"]), "version": "v", "x": 1},
                      timeout=30)
    assert r.status_code == 400 and "unknown field(s): x" in r.json()["error"]["message"]
    assert server_weight_version(base) == "default"
    assert served_tokens(server, prompts) == updated["before"]  # the failed updates changed nothing

    tensors = len(load_file(str(ckpts["new"] / WEIGHTS)))
    assert update_server_weights(base, ckpts["new"], "step-1") == {"weight_version": "step-1", "tensors": tensors}
    assert server_weight_version(base) == "step-1"
    assert served_tokens(server, prompts) == fresh  # a fresh engine's tokens on the new checkpoint

    # Back to the served checkpoint, for the other tests on this server: its tokens again.
    assert update_server_weights(base, checkpoint_path(4), "default")["weight_version"] == "default"
    assert served_tokens(server, prompts) == updated["before"]
