"""`bd3 serve CKPT --ray-replicas 2` on a local Ray instance: requests spread over both replicas, the same
tokens as `bd3 serve` at temperature 0, the same validation and key, a weight update that reaches both
replicas, and a replica killed under load (the route keeps answering from the other). One server runs the whole scenario in a background thread (tests/early.py) and records it."""
import collections
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from bd3_plugin.core.checkpoint import load_checkpoint, save_checkpoint
from bd3_plugin.tinyworld.data import checkpoint_path
from early import early_fixture
from helpers import perturb
from servers import LAUNCHED, free_port, stop, wait_healthy

BD3 = str(Path(sys.executable).with_name("bd3"))
KEY = "bd3-replicas-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
MODEL = str(checkpoint_path(4))
PROMPTS = ["<eos> the old cow", "<eos> some ships run . a", "<eos> a", "<eos> the"]
LOAD_THREADS = 4  # clients sending requests while a replica is killed: at most this many are in flight on it


def complete(base, prompt, stream=False, headers=HEADERS, **extra):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": stream} | extra
    return requests.post(f"{base}/v1/completions", json=body, headers=headers, timeout=120)


def tokens(r) -> list[int]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def streamed_text(r) -> str:
    import json

    assert r.status_code == 200, r.text
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    return "".join(json.loads(e)["choices"][0]["text"] for e in events if json.loads(e)["choices"])


def replica(r) -> str:
    return r.headers["x-bd3-replica"]


def perturbed(folder: Path) -> Path:
    """tiny-bd3-L4 with every tensor moved by seeded noise (same shapes, other tokens)."""
    ck = load_checkpoint(checkpoint_path(4))
    return save_checkpoint(perturb(ck.model), folder / "new", tokenizer=ck.tokenizer)


def under_load(base, victim_pid: int, seconds: float = 8):
    """Clients send requests in a loop; the victim replica's process is killed; they go on for `seconds`
    (Serve notices the death and sends nothing more there). Returns what they saw."""
    codes, seen, errors = collections.Counter(), collections.Counter(), []
    done = threading.Event()

    def loop(i):
        while not done.is_set():
            try:
                r = complete(base, PROMPTS[i % len(PROMPTS)])
                codes[r.status_code] += 1
                if r.status_code == 200:
                    seen[replica(r)] += 1
                else:
                    errors.append((r.status_code, r.text[:200]))
            except requests.RequestException as err:
                codes[type(err).__name__] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(LOAD_THREADS)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)  # every client has a request in flight
        os.kill(victim_pid, signal.SIGKILL)
        time.sleep(seconds)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=150)
    return SimpleNamespace(codes=codes, seen=seen, errors=errors)


def from_both(request) -> list:
    """`request(prompt)` for PROMPTS twice over, 8 at once, again until both replicas have answered (Serve's
    router picks the shorter of two queues, so one burst may land on one replica); at most 8 bursts."""
    answers = []
    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            answers += pool.map(request, PROMPTS * 2)
            if len({r.headers.get("x-bd3-replica") for r in answers}) > 1:
                break
    return answers


@early_fixture(lane="serve")
def replicas_run(folder):
    """The whole scenario on one `bd3 serve --ray-replicas 2`; every answer it needs, recorded."""
    new = perturbed(folder)
    port = free_port()
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen([BD3, "serve", MODEL, "--ray-replicas", "2", "--port", str(port),
                             "--weight-update-root", str(folder), "--", "--api-key", KEY],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    LAUNCHED.append((proc, log))
    base = f"http://127.0.0.1:{port}"
    run = SimpleNamespace(log=Path(log.name))
    try:
        wait_healthy(proc, base, log, seconds=600)
        run.before = from_both(lambda p: complete(base, p))
        run.streamed = complete(base, PROMPTS[0], stream=True)
        run.refused = complete(base, PROMPTS[0], logit_bias={"1": 1})
        run.no_key = requests.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "a"}, timeout=30)
        run.update = requests.post(f"{base}/bd3/update_weights", json={"path": new.name, "version": "v2"},
                                   headers=HEADERS, timeout=120)
        run.after = from_both(lambda p: complete(base, p))
        run.versions = from_both(lambda _: requests.get(f"{base}/bd3/weight_info", headers=HEADERS, timeout=60))
        run.victim = sorted({replica(r) for r in run.before})[0]
        run.load = under_load(base, int(run.victim.rsplit(":", 1)[1]))
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        run.returncode = proc.wait(timeout=120)
    finally:
        stop(proc, log)
    return run


@pytest.fixture(scope="module")
def run(replicas_run):
    return replicas_run


@pytest.mark.cluster
@pytest.mark.server
def test_requests_spread_over_both_replicas_with_the_tokens_of_bd3_serve(run, bd3_server):
    assert {r.status_code for r in run.before} == {200}
    assert len({replica(r) for r in run.before}) == 2, len(run.before)
    single = {p: tokens(complete(bd3_server.base, p, headers=bd3_server.headers)) for p in PROMPTS}
    assert [tokens(r) for r in run.before] == [single[p] for p in PROMPTS] * (len(run.before) // len(PROMPTS))
    plain = requests.post(f"{bd3_server.base}/v1/completions", headers=bd3_server.headers, timeout=120,
                          json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0,
                                "ignore_eos": True, "stream": True})
    assert streamed_text(run.streamed) == streamed_text(plain) != ""


@pytest.mark.cluster
@pytest.mark.server
def test_replicas_refuse_what_bd3_serve_refuses(run):
    assert run.refused.status_code == 400 and run.refused.json()["error"]["param"] == "logit_bias"
    assert run.no_key.status_code == 401


@pytest.mark.cluster
@pytest.mark.server
def test_a_weight_update_reaches_every_replica(run):
    assert run.update.status_code == 200, run.update.text
    assert {r.json()["weight_version"] for r in run.versions} == {"v2"}
    assert len({replica(r) for r in run.versions}) == len({replica(r) for r in run.after}) == 2
    by_prompt = collections.defaultdict(set)  # the new weights answer, on both replicas alike
    for prompt, r in zip(PROMPTS * len(run.after), run.after):
        by_prompt[prompt].add(tuple(tokens(r)))
    assert all(len(answers) == 1 for answers in by_prompt.values()), by_prompt
    before = {p: tuple(tokens(r)) for p, r in zip(PROMPTS, run.before)}
    assert any(before[p] not in by_prompt[p] for p in PROMPTS)


@pytest.mark.cluster
@pytest.mark.server
def test_a_killed_replica_costs_only_its_requests_in_flight(run):
    """SIGKILL one replica's process under load: the route keeps answering from the other, and the requests
    that fail are at most those in flight on the killed one, each a 5xx. (Serve then starts a replica in its
    place, which catches up with the weight log before its first answer, as the second replica did after the
    update; a hand run of that is in docs/RAY.md.)"""
    load = run.load
    failed = sum(n for code, n in load.codes.items() if code != 200)
    assert failed <= LOAD_THREADS and all(code >= 500 for code, _ in load.errors), (load.codes, load.errors)
    survivor = {replica(r) for r in run.before} - {run.victim}
    assert set(load.seen) >= survivor and load.seen[next(iter(survivor))] >= 2 * LOAD_THREADS, load.seen
    assert run.returncode == 0, run.log.read_text()[-3000:]
