"""A chat request to a server that has no chat template gets a 400 that says how to give one.

The bundled checkpoints' tokenizers define no chat template. vLLM then answers every chat request with a
400 saying only that transformers no longer supplies a default (`ChatTemplateResolutionError`, raised while
rendering the messages in `vllm/renderers/hf.py`, after the request has passed validation and before the
engine sees it). Its exception handler turns that into the response, inside the middleware, so the message is
replaced in the response on its way out: the same for /v1/chat/completions, streamed or not, and every other
route that renders messages.
"""
from __future__ import annotations

import json

from vllm_backend.server.guard import error_response

# The start of vLLM's message (vllm/renderers/hf.py, safe_apply_chat_template).
VLLM_MESSAGE = "As of transformers v4.44, default chat template is no longer allowed"

HOW_TO_GIVE_ONE = ("this checkpoint's tokenizer has no chat template and the server was started without one: "
                   "start it with one (bd3 serve CKPT -- --chat-template FILE, or vllm serve CKPT --chat-template "
                   "FILE, where FILE is a Jinja template file or the template itself), or send a prompt to "
                   "/v1/completions instead")


def explained(message: str) -> str:
    """The message a client gets: vLLM's, except where it means that no chat template was given."""
    return HOW_TO_GIVE_ONE if message.startswith(VLLM_MESSAGE) else message


def explaining(call_next):
    """`call_next` (the app behind a middleware) with vLLM's no-template 400 replaced by one that says how to
    give a template. Only 400s are read; every other response passes through untouched, streams included."""

    async def call(request):
        response = await call_next(request)
        if response.status_code != 400:
            return response
        body = b"".join([chunk async for chunk in response.body_iterator])
        return _rewritten(body, response)

    return call


def _rewritten(body: bytes, response):
    from starlette.responses import Response

    message = _error_message(body)
    if message is not None and explained(message) != message:
        return error_response(explained(message))
    return Response(content=body, status_code=response.status_code, headers=dict(response.headers))


def _error_message(body: bytes) -> str | None:
    """The message of an error in vLLM's shape; None for any other body."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, str) else None
