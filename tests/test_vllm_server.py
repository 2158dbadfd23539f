"""`bd3 serve` end to end: the real vLLM OpenAI server on 127.0.0.1 (the session's server, started with an API
key, through `bd3 serve CKPT --port N -- --api-key K ...`: tests/conftest.py), called with the openai client
and with plain HTTP; and plain `vllm serve` on another checkpoint."""
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from bd3_plugin.core.checkpoint import load_checkpoint
from bd3_plugin.tinyworld.data import checkpoint_path
from early import early_fixture
from helpers import greedy_generation
from servers import launch, stop, wait_healthy

pytestmark = pytest.mark.server
KEY = "bd3-test-key"  # the session server's (tests/conftest.py)
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(bd3_server):
    assert bd3_server.key == KEY
    client = openai.OpenAI(base_url=f"{bd3_server.base}/v1", api_key=KEY, timeout=120, max_retries=0)
    return bd3_server.base, client, client.models.list().data[0].id


def complete(client, model, prompt, **kw):
    kw.setdefault("temperature", 0.0)
    kw.setdefault("seed", 1)
    body = kw.pop("extra_body", {}) | ({"vllm_xargs": kw.pop("xargs")} if kw.get("xargs") else {})
    kw.pop("xargs", None)
    return client.completions.create(model=model, prompt=prompt, extra_body=body or None, **kw)


def test_models_and_health(server):
    base, client, model = server
    assert model == str(checkpoint_path(4))
    assert requests.get(f"{base}/health").status_code == 200


def test_completion_matches_the_core_and_counts_usage(server):
    _, client, model = server
    ckpt = load_checkpoint(checkpoint_path(4))
    prompt = "<eos> the old cow"
    r = complete(client, model, prompt, max_tokens=30, seed=7, xargs={"algorithm": "threshold"})
    core = greedy_generation(ckpt, prompt, 30, "threshold")
    choice = r.choices[0]
    assert choice.text == " " + ckpt.decode(core.tokens)
    assert choice.finish_reason == ("stop" if core.finish_reason == "eos" else "length")
    assert r.usage.prompt_tokens == 4
    assert r.usage.completion_tokens == len(core.tokens) + (choice.finish_reason == "stop")  # EOS counts
    again = complete(client, model, prompt, max_tokens=30, seed=7, xargs={"algorithm": "threshold"})
    assert again.choices[0].text == choice.text


def test_stop_strings_and_max_tokens(server):
    _, client, model = server
    r = complete(client, model, "<eos> the old cow", max_tokens=40, stop=["."], temperature=1.0, seed=2)
    assert "." not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    r = complete(client, model, "<eos> the old cow", max_tokens=6, temperature=1.0, seed=2,
                 extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_streaming_sends_one_chunk_per_block(server):
    _, client, model = server
    prompt = "<eos> some wolves"
    whole = complete(client, model, prompt, max_tokens=24, temperature=1.0, seed=3).choices[0].text
    chunks = [c.choices[0].text for c in complete(client, model, prompt, max_tokens=24, temperature=1.0, seed=3,
                                                   stream=True)]
    assert "".join(chunks) == whole
    assert all(len(c.split()) <= 4 for c in chunks) and len([c for c in chunks if c]) >= len(whole.split()) // 4


def test_concurrent_requests_equal_the_same_requests_alone(server):
    _, client, model = server
    prompts = [("<eos> the big horse", 11), ("<eos> a", 12), ("<eos> some crabs like the", 13), ("<eos>", 14)] * 2
    alone = [complete(client, model, p, max_tokens=20, temperature=1.0, seed=s).choices[0].text for p, s in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda ps: complete(client, model, ps[0], max_tokens=20, temperature=1.0,
                                                     seed=ps[1]).choices[0].text, prompts))
    assert together == alone


@pytest.mark.parametrize("stream", [False, True])
def test_bad_requests_are_400_and_the_server_stays_up(server, stream):
    base, client, model = server
    long_prompt = "<eos> " + "the cow sleeps . " * 40  # 161 tokens > 128
    cases = [(dict(prompt=long_prompt, max_tokens=4), "max_model_len|maximum context length"),
             (dict(prompt="<eos> a", max_tokens=500), "max_model_len|maximum context length"),
             (dict(prompt="<eos> a", max_tokens=8, xargs={"algorithm": "beam"}), "algorithm must be one of"),
             (dict(prompt="<eos> a", max_tokens=8, xargs={"algorithm": "threshold", "threshold": 0}), "threshold"),
             (dict(prompt="<eos> a", max_tokens=8, xargs={"threshold": 1.5}), "threshold"),
             (dict(prompt="<eos> a", max_tokens=8, xargs={"block_size": 16}), "does not match")]
    for kw, needle in cases:
        with pytest.raises(openai.BadRequestError, match=needle):
            r = complete(client, model, stream=stream, **kw)
            if stream:
                list(r)
    assert requests.get(f"{base}/health").status_code == 200
    assert complete(client, model, "<eos> a", max_tokens=8).choices[0].text


def test_load_64_requests_at_concurrency_16(server):
    _, client, model = server
    prompts = ["<eos>", "<eos> the", "<eos> the old cow sleeps . a", "<eos> " + "many owls sing . " * 6]

    def one(i):
        r = complete(client, model, prompts[i % 4], max_tokens=8 + 5 * (i % 7), temperature=1.0, seed=i,
                     xargs={"algorithm": ("first_hitting", "ddpm", "threshold")[i % 3]})
        return r.choices[0].finish_reason, r.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    assert len(results) == 64
    assert all(reason in ("stop", "length") and n >= 1 for reason, n in results)


def post(base, route, body, headers=AUTH):
    return requests.post(f"{base}/v1/{route}", json=body, headers=headers, timeout=120)


def test_api_key_is_checked_before_the_request(server):
    base, _, model = server
    assert requests.get(f"{base}/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{base}/v1/models", headers=AUTH, timeout=30).status_code == 200
    good = dict(model=model, prompt="<eos> a", max_tokens=4, temperature=1.0, seed=1)
    assert post(base, "completions", good, headers={}).status_code == 401
    assert post(base, "completions", good).status_code == 200
    assert post(base, "completions", good | {"top_k": 3}).status_code == 200  # honoured, not refused
    bad = good | {"stream": True, "min_tokens": 3}
    wrong = {"Authorization": "Bearer not-the-key"}
    assert [post(base, "completions", bad, headers=h).status_code for h in ({}, wrong)] == [401, 401]
    r = post(base, "completions", bad)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("min_tokens ")


# (request field, value that asks for it) for fields the backend does not apply; each must be a 400 naming it.
REFUSED = [("min_tokens", 3), ("repetition_penalty", 1.3), ("presence_penalty", 0.5),
           ("frequency_penalty", 0.5), ("bad_words", ["cow"]), ("allowed_token_ids", [5, 6]),
           ("logit_bias", {"5": 2.0}), ("min_p", 0.1), ("prompt_logprobs", 1),
           ("structured_outputs", {"regex": "a+"}), ("response_format", {"type": "json_object"}),
           ("use_beam_search", True), ("best_of", 2), ("guided_json", {"type": "object"})]
COMPLETION_ONLY = [("suffix", "b")]
CHAT_ONLY = []


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_every_unapplied_field_is_a_400_that_names_it(server, route, stream):
    base, _, model = server
    chat = route.startswith("chat")
    body = dict(model=model, max_tokens=8, temperature=1.0, seed=1, stream=stream)
    body |= dict(messages=[{"role": "user", "content": "the old cow"}]) if chat else dict(prompt="<eos> a")
    for name, value in REFUSED + (CHAT_ONLY if chat else COMPLETION_ONLY):
        r = post(base, route, body | {name: value})
        assert r.status_code == 400, (name, r.status_code, r.text[:300])
        message = r.json()["error"]["message"]
        assert name in message.split(":")[0], (name, message)
    assert requests.get(f"{base}/health").status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_vllm_own_checks_stay_400s_before_the_stream(server, stream):
    base, _, model = server
    body = dict(model=model, prompt="<eos> a", max_tokens=8, stream=stream)
    for bad, needle in ((dict(temperature=-1.0), "temperature"), (dict(presence_penalty=5.0), "presence_penalty"),
                        (dict(n=0), "n"), (dict(seed="x"), "seed"), (dict(top_k=-2), "top_k")):
        r = post(base, "completions", body | bad)
        assert r.status_code == 400 and needle in r.text, (bad, r.status_code, r.text[:300])
    chat = dict(model=model, messages=[{"role": "user", "content": "a"}], tools=[], stream=stream)
    r = post(base, "chat/completions", chat)
    assert r.status_code == 400 and "tools" in r.text, r.text[:300]


def test_n_samples_are_the_seeded_requests_alone(server):
    _, client, model = server
    prompt = "<eos> the old cow"
    both = complete(client, model, prompt, max_tokens=16, temperature=1.0, seed=5, n=2)
    alone = [complete(client, model, prompt, max_tokens=16, temperature=1.0, seed=s).choices[0].text for s in (5, 6)]
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == alone


def streamed(client, model, prompt, **kw) -> str:
    return "".join(c.choices[0].text for c in complete(client, model, prompt, stream=True, **kw))


@pytest.mark.parametrize("algorithm", ["first_hitting", "ddpm", "threshold"])
def test_temperature_zero_is_greedy_without_a_seed(server, algorithm):
    """Identical requests at temperature 0 and no seed give identical text: streamed or not, alone or
    among other requests; and the core's greedy text."""
    _, client, model = server
    prompt, xargs = "<eos> the old cow", {"algorithm": algorithm}
    kw = dict(max_tokens=24, temperature=0.0, seed=None, xargs=xargs)
    alone = [complete(client, model, prompt, **kw).choices[0].text, streamed(client, model, prompt, **kw)]

    def one(i):
        if i % 4 == 3:  # other traffic in the same steps: sampled requests with other prompts
            complete(client, model, "<eos> some wolves", max_tokens=20, temperature=1.0, seed=i)
            return None
        return complete(client, model, prompt, **kw).choices[0].text if i % 2 else streamed(client, model, prompt, **kw)

    with ThreadPoolExecutor(8) as pool:
        together = [t for t in pool.map(one, range(8)) if isinstance(t, str)]
    assert alone == [alone[0]] * 2 and together == [alone[0]] * 6
    ckpt = load_checkpoint(checkpoint_path(4))
    assert alone[0] == " " + ckpt.decode(greedy_generation(ckpt, prompt, 24, algorithm).tokens)


@early_fixture(order=1)
def plain_vllm_serve(folder):
    """`vllm serve tiny-bd3-L16` with no flags, started early; stopped by the test that reads it."""
    vllm = str(Path(sys.executable).with_name("vllm"))
    proc, base, log = launch(lambda port: [vllm, "serve", str(checkpoint_path(16)), "--port", str(port)], folder)
    try:
        wait_healthy(proc, base, log)
    except BaseException:
        stop(proc, log)
        raise
    return proc, base, log


def test_plain_vllm_serve_decodes_blocks_too(plain_vllm_serve):
    """`vllm serve CKPT` with no flags: the plugin fills in the block-decoding engine arguments."""
    proc, base, log = plain_vllm_serve
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=120, max_retries=0)
        r = complete(client, client.models.list().data[0].id, "<eos> the old cow", max_tokens=20, seed=4)
    finally:
        stop(proc, log)
    ckpt = load_checkpoint(checkpoint_path(16))
    assert r.choices[0].text == " " + ckpt.decode(greedy_generation(ckpt, "<eos> the old cow", 20).tokens)
