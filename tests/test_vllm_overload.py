"""The session's `bd3 serve` when clients go away and when they come all at once.

A client that drops its connection (a stream after its first chunk, a request whose client gives up, a request
for trajectories) frees the engine: no request left running or waiting, none of them run to its end, and the
next request gets the tokens it got before. A burst far above what the engine runs at once
(`--max-num-seqs`) and what vLLM admits (`--max-num-queued-reqs`) is answered: each request a 200, or vLLM's
503 at once; none left hanging. The server's limits are the session's (tests/conftest.py).
"""
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from urllib.parse import urlparse

import pytest
import requests

pytestmark = pytest.mark.server

PROMPT = "<eos> the old cow"
# 124 tokens (the model's 128 less the prompt), EOS ignored: 31 blocks, far longer than a drop takes.
LONG = {"prompt": PROMPT, "max_tokens": 124, "ignore_eos": True, "temperature": 1.0}
BUSY = "The engine is currently busy"  # vLLM's QueueOverflowError


# The samples read from /metrics, summed over their other labels: the engine's request gauges, and the count
# of requests that ran to their max_tokens.
SAMPLES = {"running": "vllm:num_requests_running{", "waiting": "vllm:num_requests_waiting{",
           "length": 'vllm:request_success_total{finished_reason="length"'}


def metrics(base: str) -> dict[str, float]:
    totals = dict.fromkeys(SAMPLES, 0.0)
    for line in requests.get(f"{base}/metrics", timeout=30).text.splitlines():
        for name, prefix in SAMPLES.items():
            if line.startswith(prefix):
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def wait_until(base: str, done, seconds: float) -> dict[str, float]:
    """The metrics once `done(metrics)` holds; the test fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        m = metrics(base)
        if done(m):
            return m
        assert time.monotonic() < deadline, f"not within {seconds} s: {m}"
        time.sleep(0.05)


def idle(m: dict) -> bool:
    return m["running"] == 0 and m["waiting"] == 0


def send(server, body: dict, stream: bool = False) -> http.client.HTTPConnection:
    """A connection on which `body` has been sent to /v1/completions and whose answer is not read."""
    url = urlparse(server.base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": server.model, "stream": stream} | body),
                 headers=server.headers | {"content-type": "application/json"})
    return conn


def first_event(conn: http.client.HTTPConnection) -> bytes:
    answer = conn.getresponse()
    assert answer.status == 200, answer.read()[:300]
    return answer.readline()


def greedy(server) -> str:
    r = requests.post(f"{server.base}/v1/completions", headers=server.headers, timeout=60,
                      json={"model": server.model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0})
    assert r.status_code == 200, r.text[:300]
    return r.json()["choices"][0]["text"]


N = 16  # connections dropped in each way


@pytest.mark.parametrize("way", ["stream after its first chunk", "client gives up", "trajectories"])
def test_a_dropped_connection_frees_the_engine(bd3_server, way):
    base = bd3_server.base
    before = greedy(bd3_server)
    start = wait_until(base, idle, 30)
    xargs = {"vllm_xargs": {"bd3_trajectory": True}} if way == "trajectories" else {}
    with ExitStack() as dropped:
        conns = [send(bd3_server, LONG | {"seed": i} | xargs, stream=way.startswith("stream")) for i in range(N)]
        for conn in conns:
            dropped.callback(conn.close)
        if way.startswith("stream"):
            assert all(first_event(c).startswith(b"data: {") for c in conns)
        else:  # all of them in the engine before their clients go
            wait_until(base, lambda m: m["running"] + m["waiting"] >= N, 30)
    after = wait_until(base, idle, 10)
    assert after["length"] == start["length"], "a dropped request ran to its end"
    assert greedy(bd3_server) == before


def answer_of(server, i: int) -> tuple[int, str]:
    """(status, error message or '') of one short request of a burst; a client timeout fails the test."""
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": i,
            "stream": i % 2 == 1}
    r = requests.post(f"{server.base}/v1/completions", json=body, headers=server.headers, timeout=60)
    text = r.text
    if r.status_code != 200:
        return r.status_code, json.loads(text)["error"]["message"]
    return 200, "" if not body["stream"] else text[-14:].strip()  # a stream ends with [DONE]


def test_a_burst_above_the_limits_is_answered(bd3_server):
    base = bd3_server.base
    limit = bd3_server.max_num_queued_reqs
    wait_until(base, idle, 30)
    # One request whose choices fill the queue (not streamed: a dropped stream of n choices can take seconds
    # to be aborted): the engine runs max_num_seqs of them, the rest wait, and vLLM admits nothing more.
    held = send(bd3_server, LONG | {"n": limit, "seed": 1})
    try:
        full = wait_until(base, lambda m: m["running"] + m["waiting"] == limit, 30)
        assert full["running"] == bd3_server.max_num_seqs, full
        with ThreadPoolExecutor(16) as pool:
            refused = list(pool.map(lambda i: answer_of(bd3_server, i), range(16)))
        assert all(status == 503 and message.startswith(BUSY) for status, message in refused), refused
    finally:
        held.close()
    wait_until(base, idle, 10)
    # A burst of its own, past the queue's limit: every request answered, refused ones with vLLM's 503 at once.
    # A request is refused only while `limit` others are in flight, and those are answered: `limit` 200s at least.
    burst = limit + 2 * bd3_server.max_num_seqs
    with ThreadPoolExecutor(burst) as pool:
        answers = list(pool.map(lambda i: answer_of(bd3_server, i), range(burst)))
    assert all(a in ((200, ""), (200, "data: [DONE]")) or (a[0] == 503 and a[1].startswith(BUSY))
               for a in answers), [a for a in answers if a[0] != 200][:5]
    assert sum(status == 200 for status, _ in answers) >= limit
    assert requests.get(f"{base}/health", timeout=30).status_code == 200
    wait_until(base, idle, 10)
