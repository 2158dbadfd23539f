"""Weight updates in a running vLLM engine against a fresh engine on the new checkpoint, and who may make them.

The engines run in the session's engine process (one engine per job, tests/vllm_weights_worker.py); the
server is the session's `bd3 serve`, put back on its checkpoint after the test. What the /bd3 routes answer
before a request reaches the engine (the key, the start-up flag, the root) is checked on vLLM's app built in
this process with no engine behind it (`servers.vllm_app`).
The second checkpoint is tiny-bd3-L4 with every tensor perturbed by seeded noise, saved by the core.
"""
import os
import shutil

import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from bd3_plugin.core.checkpoint import WEIGHTS, CheckpointError, load_checkpoint, read_config, save_checkpoint
from bd3_plugin.tinyworld.data import checkpoint_path
from engines import L4_OWN_PROCESSES
from helpers import perturb
from servers import vllm_app
from vllm_backend.worker.weights import check_source
from vllm_backend.server.serve import WEIGHT_ROOT_ENV, environment
from vllm_backend.server.weight_routes import OUTSIDE_ROOT, inside_root, parse_update_request

PROMPTS = ["<eos> the old cow", "<eos> some ships run . a", "<eos>"]
EXTRA = "backbone.extra.weight"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """tiny-bd3-L4, a perturbed copy (same shapes, other weights), and bad sources made from the copy."""
    root = tmp_path_factory.mktemp("weights")
    ck = load_checkpoint(checkpoint_path(4))
    new = save_checkpoint(perturb(ck.model), root / "new", tokenizer=ck.tokenizer)
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
                                                                 "unknown field"), (b"[" * 100_000, "JSON object")]:
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
    if server_weight_version(bd3_server.base, api_key=bd3_server.key) != "default":
        update_server_weights(bd3_server.base, bd3_server.served_weights, "default", api_key=bd3_server.key)


@pytest.mark.engine
@pytest.mark.server
def test_server_update_route(server, runs, ckpts):
    from vllm_backend.worker.weights import WeightUpdateError
    from vllm_backend.server.weight_routes import server_weight_version, update_server_weights

    fresh, updated = runs
    prompts, base, key = ckpts["prompts"], server.base, server.key
    assert server_weight_version(base, api_key=key) == "default"
    assert served_tokens(server, prompts) == updated["before"]  # the offline engine's tokens on tiny-bd3-L4

    with pytest.raises(WeightUpdateError) as err:
        update_server_weights(base, ckpts["bad"], "bad", api_key=key)
    assert str(err.value).startswith("400: ")
    _names_every_bad_tensor(str(err.value), ckpts)
    r = requests.post(f"{base}/bd3/update_weights", json={"path": str(ckpts["new"]), "version": "v", "x": 1},
                      headers=server.headers, timeout=30)
    assert r.status_code == 400 and "unknown field(s): x" in r.json()["error"]["message"]
    assert server_weight_version(base, api_key=key) == "default"
    assert served_tokens(server, prompts) == updated["before"]  # the failed updates changed nothing

    tensors = len(load_file(str(ckpts["new"] / WEIGHTS)))
    assert update_server_weights(base, ckpts["new"], "step-1", api_key=key) == {"weight_version": "step-1",
                                                                                "tensors": tensors}
    assert server_weight_version(base, api_key=key) == "step-1"
    assert served_tokens(server, prompts) == fresh  # a fresh engine's tokens on the new checkpoint

    # Back to the served checkpoint (its copy inside the root), for the other tests on this server.
    assert update_server_weights(base, server.served_weights, "default", api_key=key)["weight_version"] == "default"
    assert served_tokens(server, prompts) == updated["before"]


@pytest.mark.server
def test_server_weight_routes_take_the_key_and_read_only_under_the_root(server, ckpts):
    """Without the key nothing changes: the same version and the same temperature-0 tokens. The root that
    `bd3 serve --weight-update-root` names reaches the server: the bundled checkpoint, outside it, is a 403."""
    from vllm_backend.server.weight_routes import server_weight_version

    base, prompts = server.base, ckpts["prompts"]
    before = served_tokens(server, prompts)
    update = {"path": str(ckpts["new"]), "version": "evil"}  # a good checkpoint inside the root
    for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": server.key}):
        r = requests.post(f"{base}/bd3/update_weights", json=update, headers=headers, timeout=30)
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"}), (headers, r.text)
        assert requests.get(f"{base}/bd3/weight_info", headers=headers, timeout=30).status_code == 401
    outside = {"path": str(checkpoint_path(4)), "version": "evil"}
    r = requests.post(f"{base}/bd3/update_weights", json=outside, headers=server.headers, timeout=30)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["message"] == OUTSIDE_ROOT.format(server.weight_root.resolve())
    assert server_weight_version(base, api_key=server.key) == "default"
    assert served_tokens(server, prompts) == before


# ---- the routes before the engine: vLLM's app in this process -----------------------------------------
KEY = "route-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def client():
    from starlette.testclient import TestClient

    return TestClient(vllm_app("--api-key", KEY))  # an exception that escapes the app fails the test


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A weight-update root holding a checkpoint, beside a folder outside it holding another; the server's
    update route reads under the root, as `bd3 serve --weight-update-root` sets it."""
    inside, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(checkpoint_path(4), inside / "ck")
    shutil.copytree(checkpoint_path(4), outside / "ck")
    monkeypatch.setenv(WEIGHT_ROOT_ENV, str(inside))
    return inside.resolve()


def test_without_the_start_up_flag_there_is_no_update_route(client, monkeypatch):
    monkeypatch.delenv(WEIGHT_ROOT_ENV, raising=False)
    body = {"path": str(checkpoint_path(4)), "version": "v"}
    assert client.post("/bd3/update_weights", json=body, headers=AUTH).status_code == 404
    assert client.get("/bd3/no_such_route", headers=AUTH).status_code == 404


def test_every_bd3_route_takes_the_key_before_the_body(client, root):
    body = {"path": "ck", "version": "v"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for method, route in (("POST", "/bd3/update_weights"), ("GET", "/bd3/weight_info"), ("GET", "/bd3/x")):
            r = client.request(method, route, json=body, headers=headers)
            assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"}), (method, route, headers)
        r = client.post("/bd3/update_weights", content=b"not json", headers=headers)  # the key comes first
        assert r.status_code == 401


def test_paths_outside_the_root_are_403s_that_tell_nothing(client, root):
    outside = root.parent / "outside"
    (root / "to_ck").symlink_to(outside / "ck")
    (root / "to_nothing").symlink_to(outside / "missing")
    (root / "linked_weights").mkdir()  # a folder inside whose weights file is a link to one outside
    (root / "linked_weights" / WEIGHTS).symlink_to(outside / "ck" / WEIGHTS)
    shutil.copy(outside / "ck" / "config.json", root / "linked_weights" / "config.json")
    named_outside = [("../outside/ck", "../outside/missing"), (f"{root}/../outside/ck", f"{root}/../outside/nope"),
                     ("ck/../../outside/ck", "ck/../../x/y"), (str(outside / "ck"), str(outside / "missing")),
                     ("/etc/passwd", "/etc/no-such-file")]
    through_links = [("to_ck", "to_nothing"), (f"to_ck/{WEIGHTS}", f"to_nothing/{WEIGHTS}"),
                     ("linked_weights", "to_ck/../to_nothing")]
    answers = set()
    for existing, missing in named_outside + through_links:
        for path in (existing, missing):
            r = client.post("/bd3/update_weights", json={"path": path, "version": "v"}, headers=AUTH)
            assert r.status_code == 403, (path, r.text)
            answers.add(r.text)
    assert answers == {r.text}  # one answer, the same for a path that exists and one that does not
    assert r.json()["error"] == {"message": OUTSIDE_ROOT.format(root), "type": "PermissionDeniedError",
                                 "param": "path", "code": 403}


def test_paths_inside_the_root_resolve_there(root):
    (root / "alias").symlink_to(root / "ck")
    for path in ("ck", str(root / "ck"), "alias", "ck/../ck", "./ck/"):
        assert inside_root(path, root) == root / "ck", path
    assert inside_root(f"alias/{WEIGHTS}", root) == root / "ck" / WEIGHTS
    assert inside_root("missing", root) == root / "missing"  # inside: the update's own checks answer for it
    assert inside_root("ck\0", root) is None  # no path with a NUL byte can be read


def test_bd3_serve_passes_the_root_to_the_server_alone(tmp_path, monkeypatch, capsys):
    """`bd3 serve --weight-update-root DIR` puts the resolved DIR in the server's environment; an inherited
    variable never opens the route; without a key the start says who can then update the weights."""
    from bd3_plugin.cli.main import main

    started = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.append((argv, env)))
    monkeypatch.setenv(WEIGHT_ROOT_ENV, "/inherited")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert main(["serve", "--port", "1"]) == 0
    assert WEIGHT_ROOT_ENV not in started[-1][1] and "--weight-update-root" not in started[-1][0]
    assert "open to anyone" not in capsys.readouterr().err
    assert main(["serve", "--weight-update-root", str(tmp_path / "."), "--", "--api-key", "k"]) == 0
    assert started[-1][1][WEIGHT_ROOT_ENV] == str(tmp_path.resolve())
    assert "open to anyone" not in capsys.readouterr().err
    assert main(["serve", "--weight-update-root", str(tmp_path)]) == 0
    assert f"update_weights (reading under {tmp_path.resolve()}) is open to anyone" in capsys.readouterr().err
    assert main(["serve", "--weight-update-root", str(tmp_path / "missing")]) == 2
    assert "--weight-update-root" in capsys.readouterr().err and len(started) == 3
    assert WEIGHT_ROOT_ENV not in environment(None) and os.environ[WEIGHT_ROOT_ENV] == "/inherited"
