"""Malformed request bodies are 400s in vLLM's error shape, an internal error is a 500 with a JSON body, and
neither drops the connection.

Starlette's last-resort handler answers an exception that escapes a middleware and then raises it again,
and uvicorn then closes the connection: a kept-alive client sees a reset. The checks before the engine run on
vLLM's app in this process (`servers.vllm_app`), whose TestClient raises any exception that escapes; one
test sends the same bodies to the session's `bd3 serve` on a single kept-alive connection.
"""
import http.client
import json
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest

from servers import vllm_app

KEY = "bodies-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = {"model": "m", "prompt": "<eos> a", "max_tokens": 4}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "a"}], "max_tokens": 4}

# (route, raw body, the field the 400 names or None where vLLM's message names it in its own words)
BAD = [("completions", {"prompt": [-5]}, "prompt.0"),
       ("completions", {"prompt": [1000000], "top_p": [1099511627776], "seed": {}, "logit_bias": 0}, "logit_bias"),
       ("completions", {"prompt": "", "bad_words": 3.7, "seed": -1, "presence_penalty": "ün"}, "prompt"),
       ("chat/completions", {"messages": None}, "messages"),
       ("chat/completions", CHAT | {"messages": 5}, "messages"),
       ("chat/completions", CHAT | {"messages": 3.7}, "messages"),
       ("chat/completions", CHAT | {"messages": "a"}, "messages"),
       ("chat/completions", CHAT | {"messages": [None]}, None),
       ("chat/completions", CHAT | {"stop": {}}, "stop"),
       ("completions", PROMPT | {"stop": 3}, "stop"),
       ("completions", PROMPT | {"prompt": [[1, 2], "x"]}, None),
       ("completions", PROMPT | {"logit_bias": {"x": "y"}}, "logit_bias.x"),
       ("completions", [1, 2], None),
       ("completions", "[" * 100_000, None),  # past the JSON parser's recursion limit
       ("completions", '{"prompt": "a", "n": NaN}', "n"),
       ("completions", '{"prompt": "a", "max_tokens": 1e999}', "max_tokens"),
       ("completions", b"\xff\xfe", None),
       ("completions", PROMPT | {"request_id": "\ud800"}, "request_id"),  # the engine's messages cannot carry it
       ("chat/completions", CHAT | {"stream_interval": 10**30}, "stream_interval"),  # nor an int beyond 64 bits
       ("chat/completions", CHAT | {"messages": [{"role": "user", "content": "a\udfff"}]}, "messages.0.content")]
# Bodies judged against the served model (its vocabulary; the test names the model): the session's server
# only. vLLM checks the first two only once a stream has begun, and sent them as a 200 whose only event is
# the error.
SERVED = [("completions", PROMPT | {"prompt": [5, 99999], "stream": True}, None),
          ("completions", PROMPT | {"stop_token_ids": [-1], "stream": True}, "stop_token_ids"),
          ("completions", PROMPT | {"temperature": float("inf")}, "temperature")]


def _raw(body) -> bytes:
    if isinstance(body, bytes):
        return body
    return body.encode() if isinstance(body, str) else json.dumps(body).encode()


def _is_400_naming(status: int, data: bytes, field) -> str:
    """'' when the answer is a 400 in vLLM's error shape naming `field`; what is wrong otherwise."""
    try:
        error = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        return f"not vLLM's error shape: {status} {data[:300]!r}"
    if status != 400 or error.get("code") != 400 or not error.get("message"):
        return f"{status}: {error}"
    if field is not None and not (error.get("param") or "").endswith(field):
        return f"param {error.get('param')!r} does not name {field}: {error}"
    return ""


@pytest.fixture(scope="module")
def client():
    from starlette.testclient import TestClient

    app = vllm_app("--api-key", KEY)
    # The middleware acts for a BD3 model; what it reads before a body passes validation is the model type.
    app.state.vllm_config = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(model_type="bd3lm")))
    return TestClient(app)  # raises any exception that escapes the app


@pytest.mark.parametrize("route, body, field", BAD, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD)])
def test_a_malformed_body_is_a_400_that_names_the_field(client, route, body, field):
    r = client.post(f"/v1/{route}", content=_raw(body), headers=AUTH | {"content-type": "application/json"})
    assert _is_400_naming(r.status_code, r.content, field) == ""


def test_the_field_at_fault_in_an_exception_from_vllm_validators():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from vllm_backend.server.validate import field_at_fault

    for body in (CHAT | {"messages": None}, CHAT | {"messages": 5, "seed": 3, "n": 2}):
        with pytest.raises(TypeError) as err:
            ChatCompletionRequest.model_validate(body)
        assert field_at_fault(ChatCompletionRequest, body, err.value) == "messages"
    # Negative control: an error that stays whatever one field is dropped has no field to name.
    assert field_at_fault(ChatCompletionRequest, CHAT, TypeError("not from this body")) is None


def test_the_batched_chat_route_which_the_checks_do_not_read_is_refused(client):
    """vLLM's /v1/chat/completions/batch takes conversations the body checks do not read: a 404 naming the
    route to use, after the key (so that it says nothing to a caller without one)."""
    body = {"messages": [[{"role": "user", "content": "the"}]], "max_tokens": 4, "logit_bias": {"3": 5}}
    assert client.post("/v1/chat/completions/batch", json=body).status_code == 401
    r = client.post("/v1/chat/completions/batch", json=body, headers=AUTH)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == 404 and "send each conversation to /v1/chat/completions" in error["message"]


def test_an_internal_error_is_a_500_with_a_json_body(client):
    # No engine behind this app: the weight route's call to it raises inside the middleware, and vLLM's
    # model list raises inside vLLM's route; neither exception escapes.
    for route in ("/bd3/weight_info", "/v1/models"):
        r = client.get(route, headers=AUTH)
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["code"] == 500 and error["type"] == "InternalServerError" and error["message"]


@pytest.mark.server
def test_the_server_answers_every_malformed_body_on_a_kept_alive_connection(bd3_server):
    url = urlparse(bd3_server.base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    headers = bd3_server.headers | {"content-type": "application/json"}
    wrong = []
    never_admitted = ("completions", PROMPT | {"n": bd3_server.max_num_queued_reqs + 1}, "n")  # not a 503: a 400
    served = [(route, body | {"model": bd3_server.model}, field) for route, body, field in SERVED + [never_admitted]]
    for route, body, field in BAD + served:
        conn.request("POST", f"/v1/{route}", body=_raw(body), headers=headers)
        answer = conn.getresponse()
        problem = _is_400_naming(answer.status, answer.read(), field)
        if problem:
            wrong.append((route, str(body)[:80], problem))
    conn.request("GET", "/health")  # on the same connection: it was never dropped
    health = conn.getresponse()
    assert (health.status, health.read()) == (200, b"")
    assert wrong == []
    good = PROMPT | {"model": bd3_server.model}
    conn.request("POST", "/v1/completions", body=json.dumps(good | {"stream": True}), headers=headers)
    answer = conn.getresponse()
    assert answer.status == 200 and answer.read().startswith(b"data: {")  # a stream that begins well is replayed
    conn.request("POST", "/v1/completions", body=json.dumps(good), headers=headers)
    answer = conn.getresponse()
    assert answer.status == 200 and json.loads(answer.read())["choices"][0]["text"]


def _render_without_template(checkpoint):
    """A chat route that renders the messages as vLLM's renderer does (`safe_apply_chat_template`), with the
    checkpoint's tokenizer and no template from the server: vLLM's own error for a missing template."""
    from transformers import AutoTokenizer
    from vllm.renderers.hf import safe_apply_chat_template

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model_config = SimpleNamespace(tokenizer=checkpoint, model=checkpoint, tokenizer_revision=None,
                                   code_revision=None, trust_remote_code=False,
                                   hf_config=SimpleNamespace(model_type="bd3lm"))

    async def create_chat_completion(request, raw_request):
        safe_apply_chat_template(model_config, tokenizer, [dict(m) for m in request.messages])

    return create_chat_completion


@pytest.fixture
def chat_state(client):
    """The app's state for a chat body that passes the middleware's checks and reaches vLLM's chat route,
    whose handler (`openai_serving_chat`) the test sets; put back afterwards."""
    from bd3_plugin.core.checkpoint import read_config
    from bd3_plugin.tinyworld.data import checkpoint_path

    cfg = read_config(checkpoint_path(4))
    hf = SimpleNamespace(model_type="bd3lm", block_size=cfg.block_size, vocab_size=cfg.vocab_size)
    state = client.app.state
    before = state.vllm_config
    model = SimpleNamespace(hf_config=hf, max_model_len=cfg.model_length, get_diff_sampling_param=dict)
    state.vllm_config = SimpleNamespace(model_config=model, scheduler_config=SimpleNamespace(max_num_queued_reqs=None))
    yield state
    state.vllm_config = before
    del state.openai_serving_chat


@pytest.mark.parametrize("stream", [False, True])
def test_chat_without_a_chat_template_is_a_400_that_says_how_to_give_one(client, chat_state, stream):
    from bd3_plugin.tinyworld.data import checkpoint_path
    from vllm_backend.server.chat_template import HOW_TO_GIVE_ONE

    ckpt = str(checkpoint_path(4))
    chat_state.openai_serving_chat = SimpleNamespace(create_chat_completion=_render_without_template(ckpt))
    r = client.post("/v1/chat/completions", json=CHAT | {"model": ckpt, "stream": stream}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"] == {"message": HOW_TO_GIVE_ONE, "type": "BadRequestError",
                                                          "param": None, "code": 400}
    assert "bd3 serve CKPT -- --chat-template FILE" in HOW_TO_GIVE_ONE
    assert "vllm serve CKPT --chat-template FILE" in HOW_TO_GIVE_ONE

    # Negative control: any other 400 from the route passes through as vLLM wrote it.
    async def other_error(request, raw_request):
        raise ValueError("some other problem with the messages")

    chat_state.openai_serving_chat.create_chat_completion = other_error
    r = client.post("/v1/chat/completions", json=CHAT | {"model": ckpt, "stream": stream}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["message"] == "some other problem with the messages"
