"""Property-based fuzzing of the session's `bd3 serve` on its two generation routes.

Bodies are drawn from the OpenAI request schemas vLLM itself defines (`CompletionRequest` and
`ChatCompletionRequest`, `model_json_schema()`), walked by `schema_strategies.schema_values`, and mixed with
values no schema allows (`hostile_values`), with what this backend adds (`vllm_xargs`), token ids outside
the vocabulary and prompts longer than the model. Whatever the body, the answer is a 2xx or a 4xx with a JSON
body; a 2xx parses with the OpenAI SDK's response types (a stream: every chunk does); the server stays
healthy. On a failure hypothesis prints the shrunk body, and the bytes sent and the answer are noted.

The number of bodies comes from the hypothesis profile (tests/conftest.py): `--hypothesis-profile=long`
for a long run, `--hypothesis-show-statistics` for the shares of the answers' statuses.
"""
import json
from typing import Literal

import openai.types
import openai.types.chat
import pytest
import requests
from hypothesis import event, given, note
from hypothesis import strategies as st
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from bd3_plugin.tinyworld.data import checkpoint_path
from vllm_backend.server import fields
from schema_strategies import hostile_values, lone_surrogate_text, nested, schema_values, weighted

pytestmark = pytest.mark.server

VOCAB = 102  # tiny-bd3-L4's vocabulary: ids from 0 to 101
LONG_TEXT = "the cow sleeps . " * 40  # 161 tokens, longer than the model's 128
LONG_IDS = list(range(3, 203))


def _schema(model) -> tuple[dict, dict]:
    schema = model.model_json_schema()
    return schema["properties"], schema.get("$defs", {})


def _token_ids() -> st.SearchStrategy:
    ids = weighted((4, st.integers(0, VOCAB - 1)), (1, st.integers(VOCAB - 2, VOCAB + 2)), (1, st.integers(-3, -1)),
                   (1, st.sampled_from([2**31, 2**63, 10**30])))
    return st.lists(ids, min_size=1, max_size=6)


def _prompts(properties, defs) -> st.SearchStrategy:
    """Prompts of every kind the schema allows, token ids outside the vocabulary, and prompts longer than the
    model."""
    return weighted((3, st.sampled_from(["<eos> the old cow", "<eos>", ""])),
                    (2, schema_values(properties["prompt"], defs)), (2, _token_ids()),
                    (1, st.lists(_token_ids(), min_size=1, max_size=3)),
                    (1, st.sampled_from([LONG_TEXT, LONG_IDS])), (1, lone_surrogate_text()), (1, hostile_values()))


def _xargs() -> st.SearchStrategy:
    """The backend's own `vllm_xargs` (the sampler's settings, trajectories, a resumed block), valid or not."""
    def either(valid):
        return weighted((2, valid), (1, hostile_values()))

    return st.fixed_dictionaries({}, optional={
        "algorithm": either(st.sampled_from(["first_hitting", "ddpm", "threshold", "beam"])),
        "steps": either(st.integers(0, 8)), "threshold": either(st.floats(0.0, 1.5)),
        "block_size": either(st.sampled_from([4, 16])), "bd3_trajectory": either(st.booleans()),
        "resume_block": either(st.lists(st.integers(-1, VOCAB + 1), min_size=3, max_size=5))})


def _field_values(properties: dict, defs: dict, overrides: dict) -> dict[str, st.SearchStrategy]:
    """Each field's values: of its schema's types (twice as likely) or hostile."""
    values = {}
    for name, schema in properties.items():
        valid = overrides[name] if name in overrides else schema_values(schema, defs)
        values[name] = weighted((2, valid), (1, hostile_values()))
    return values


@st.composite
def _requests(draw, base: dict, names: list[str], applied: list[str], values: dict) -> dict:
    """`base` streamed or not, with up to three fields set (a field the backend applies as likely as any other)
    and now and then one or two of its own fields dropped."""
    body = base | {"stream": draw(st.booleans())}
    chosen = draw(st.lists(st.sampled_from(applied) | st.sampled_from(names), max_size=3, unique=True))
    for name in chosen:
        body[name] = draw(values[name])
    if draw(st.integers(0, 5)) == 0:
        for name in draw(st.lists(st.sampled_from(sorted(base)), min_size=1, max_size=2, unique=True)):
            body.pop(name, None)
    return body


def _whole_bodies() -> st.SearchStrategy:
    """Bodies that are not a JSON object at all (raw bytes or a JSON value of another kind)."""
    return st.one_of(st.sampled_from([b"", b"{", b"\xff\xfe", b"nul", b'{"prompt": "a", "n": NaN}',
                                      b"[" * 100_000, b'{"a": ' * 5000]),
                     st.builds(nested, st.sampled_from([10, 999])), hostile_values())


def bodies(model, base: dict, overrides: dict) -> st.SearchStrategy:
    """Request bodies for a route whose request model is `model`: `base` (a valid request) with fields of the
    model's schema set, added or dropped; one in five is no request at all."""
    properties, defs = _schema(model)
    values = _field_values(properties, defs, overrides | {"vllm_xargs": _xargs()})
    applied = sorted(set(fields.HONOURED) & set(properties))
    request = _requests(base, sorted(properties), applied, values)
    return weighted((4, request), (1, _whole_bodies()))


class StreamedChoice(openai.types.CompletionChoice):
    """A choice in a streamed completion: the SDK reads streams into `Completion` without validating them,
    and a choice's chunks before its last have no finish reason yet."""
    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class CompletionChunk(openai.types.Completion):
    choices: list[StreamedChoice]


class ContinuedMessage(openai.types.chat.ChatCompletionMessage):
    """vLLM answers a chat request that continues its last message (`add_generation_prompt` false) with that
    message's role, which the SDK's type does not allow (it reads responses without validating them)."""
    role: Literal["assistant", "user", "system", "developer", "tool"]


class ContinuedChoice(openai.types.chat.chat_completion.Choice):
    message: ContinuedMessage


class ChatCompletion(openai.types.chat.ChatCompletion):
    choices: list[ContinuedChoice]


def encode(body) -> bytes:
    """The bytes sent: a JSON text (NaN and infinities as Python writes them, lone surrogates as \\u escapes)."""
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of a server-sent-event stream, in order."""
    events = [e.strip() for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), f"not an event stream: {text[:500]!r}"
    return [e[len("data: "):] for e in events]


def check_answer(answer: requests.Response, whole_type, chunk_type) -> None:
    """The properties every answer has: a 2xx or 4xx; an error is JSON in vLLM's error shape; a 2xx parses with
    the OpenAI SDK's types."""
    status = answer.status_code
    assert 200 <= status < 300 or 400 <= status < 500, f"status {status}"
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        assert status == 200
        events = sse_events(answer.text)
        assert events[-1] == "[DONE]", events[-3:]
        for chunk in events[:-1]:
            chunk_type.model_validate(json.loads(chunk))  # an error event mid-stream fails here
        return
    data = answer.json()
    if status >= 400:
        error = data["error"]
        assert isinstance(error["message"], str) and error["code"] == status, data
    else:
        whole_type.model_validate(data)


def post_and_check(server, session, route: str, body, whole_type, chunk_type) -> None:
    raw = encode(body)
    note(f"POST /v1/{route} {raw[:3000]!r}")
    answer = session.post(f"{server.base}/v1/{route}", data=raw, timeout=120,
                          headers=server.headers | {"content-type": "application/json"})
    note(f"answer {answer.status_code} {answer.headers.get('content-type')} {answer.text[:1500]!r}")
    event(f"status {answer.status_code}")  # the statuses' shares: pytest --hypothesis-show-statistics
    check_answer(answer, whole_type, chunk_type)


@pytest.fixture(scope="module")
def session(bd3_server):
    """One kept-alive connection for all bodies: a body that makes the server drop it fails the test."""
    with requests.Session() as s:
        yield s


MODEL = str(checkpoint_path(4))  # the session server's (tests/conftest.py)
COMPLETION_BASE = {"model": MODEL, "prompt": "<eos> the old cow", "max_tokens": 8}
CHAT_BASE = {"model": MODEL, "messages": [{"role": "user", "content": "the old cow"}], "max_tokens": 8}


def _completion_overrides() -> dict:
    properties, defs = _schema(CompletionRequest)
    return {"prompt": _prompts(properties, defs)}


def _chat_overrides() -> dict:
    content = weighted((4, st.text(max_size=20)), (1, lone_surrogate_text()), (1, st.just(LONG_TEXT)))
    messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                               "content": content}), min_size=1, max_size=3)
    properties, defs = _schema(ChatCompletionRequest)
    return {"messages": weighted((2, messages), (1, schema_values(properties["messages"], defs)))}


@given(body=bodies(CompletionRequest, COMPLETION_BASE, _completion_overrides()))
def test_every_completion_body_gets_an_answer(bd3_server, session, body):
    post_and_check(bd3_server, session, "completions", body, openai.types.Completion, CompletionChunk)


@given(body=bodies(ChatCompletionRequest, CHAT_BASE, _chat_overrides()))
def test_every_chat_body_gets_an_answer(bd3_server, session, body):
    post_and_check(bd3_server, session, "chat/completions", body, ChatCompletion, openai.types.chat.ChatCompletionChunk)


def test_the_server_is_healthy_after_the_bodies(bd3_server, session):
    assert session.get(f"{bd3_server.base}/health", timeout=30).status_code == 200
