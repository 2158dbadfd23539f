"""What the routes and middleware a BD3 server adds share with vLLM's own: the API key, the error shape, and
no exception that escapes to the ASGI server.

An exception that leaves a middleware reaches Starlette's last-resort handler, which answers it and then
raises it again; uvicorn then closes the connection, so a client on a kept-alive connection sees a reset.
`guarded` answers every exception inside the middleware with a JSON error instead. `unencodable` finds what
a request body holds that the engine cannot carry; `stream_error_first` turns a stream whose first event is
an error into that error's status.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from http import HTTPStatus

logger = logging.getLogger(__name__)

TOO_DEEP = "the request body is nested too deeply to parse"


def error_response(message: str, param: str | None = None, status: HTTPStatus = HTTPStatus.BAD_REQUEST,
                   kind: str = "BadRequestError"):
    """An error in vLLM's shape (400 unless `status` says otherwise), naming the field `param` where one can
    be named."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": int(status)}},
                        status_code=int(status))


def unauthorized():
    """vLLM's own answer to a request without the API key (`AuthenticationMiddleware`), to the letter."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": "Unauthorized"}, status_code=HTTPStatus.UNAUTHORIZED)


def authenticated(request) -> bool:
    """Whether vLLM's AuthenticationMiddleware (if the server has one) lets this request's headers through.
    User middleware wraps vLLM's, so this runs first: on /v1 an unauthenticated request must get vLLM's 401,
    not a 400 that reveals how the server validates requests; outside /v1 vLLM checks no key at all."""
    state = request.app.state
    guard = getattr(state, "_bd3_auth", False)
    if guard is False:
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

        guard = None
        for m in request.app.user_middleware:
            if m.cls is AuthenticationMiddleware:
                guard = AuthenticationMiddleware(None, *m.args, **m.kwargs)
        state._bd3_auth = guard
    return guard is None or guard.verify_token(request.headers)


def route_path(request) -> str:
    """The request's path without the server's `--root-path`, as vLLM's key check reads it."""
    return request.scope["path"].removeprefix(request.scope.get("root_path", ""))


def json_body(raw: bytes):
    """A request body's JSON value (`{}` for an empty body); ValueError for anything that is not JSON,
    a body nested past the parser's recursion limit included."""
    try:
        return json.loads(raw or b"{}")
    except RecursionError:
        raise ValueError(TOO_DEEP) from None


# What a value the engine cannot carry looks like in the raw body: a JSON escape of a surrogate (\uD800 to
# \uDFFF; UTF-8 itself holds none), or a number of 19 digits or more (2**63 has 19).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_LONG_NUMBER = re.compile(rb"[0-9]{19}")
INT64 = range(-2**63, 2**63)
LONE_SURROGATE = "a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape without its pair), which is not text"
BEYOND_INT64 = "an integer beyond 64 bits"


def unencodable(raw: bytes, body) -> tuple[str, str] | None:
    """(where, what) for a value in `body` (parsed from `raw`) that the engine cannot carry, else None; `where` is
    a dotted path ('' for the body itself). JSON lets a string escape half of a surrogate pair alone, which
    Python decodes to a code point that every later encoding (the tokenizer, the log) fails on; and JSON
    integers have no bound, while the engine's messages carry 64 bits (vLLM checks the range of a few fields,
    not of every one)."""
    if not (_SURROGATE_ESCAPE.search(raw) or _LONG_NUMBER.search(raw)):
        return None
    stack = [("", body)]
    while stack:
        where, value = stack.pop()
        what = _why_unencodable(value)
        if what is not None:
            return where, what
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if isinstance(key, str) and not _encodable(key):
                return where, LONE_SURROGATE
            stack.append((f"{where}.{key}" if where else str(key), item))
    return None


def _why_unencodable(value) -> str | None:
    if isinstance(value, str) and not _encodable(value):
        return LONE_SURROGATE
    if isinstance(value, int) and value not in INT64:
        return BEYOND_INT64
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


async def stream_error_first(response):
    """A streamed answer whose first event is an error, as that error's JSON answer with its status; any other
    answer unchanged. vLLM checks some fields of a streamed request only once its 200 has been sent (prompt
    token ids and stop_token_ids against the vocabulary, among others), and then sends the error as the
    stream's only event: a client that checks the status reads it as a success."""
    if response.status_code != 200 or not response.headers.get("content-type", "").startswith("text/event-stream"):
        return response
    chunks = response.body_iterator
    first = b""
    async for chunk in chunks:
        first += chunk if isinstance(chunk, bytes) else chunk.encode()
        if b"\n\n" in first:
            break
    error = _event_error(first)
    if error is None:
        response.body_iterator = _replayed(first, chunks)
        return response
    await chunks.aclose()
    return error_response(error.get("message") or "", error.get("param"), HTTPStatus(error["code"]),
                          error.get("type") or "BadRequestError")


_ERROR_CODES = frozenset(int(status) for status in HTTPStatus if status >= 400)


def _event_error(events: bytes) -> dict | None:
    """The error object of the first server-sent event in `events` when it is `data: {"error": {..., "code":
    an HTTP error status}}`, else None."""
    first = events.split(b"\n\n", 1)[0].strip()
    try:
        error = json.loads(first.removeprefix(b"data: "))["error"]
    except (ValueError, KeyError, TypeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return error if isinstance(code, int) and code in _ERROR_CODES else None


async def _replayed(first: bytes, rest):
    if first:
        yield first
    async for chunk in rest:
        yield chunk


def _internal_error(err: Exception):
    from vllm.entrypoints.serve.exception_handling.utils import sanitize_message

    first_line = sanitize_message((str(err).splitlines() or [""])[0])  # no paths or addresses, as vLLM's own
    return error_response(f"internal error: {type(err).__name__}: {first_line}",
                          status=HTTPStatus.INTERNAL_SERVER_ERROR, kind="InternalServerError")


def _app_error(err: Exception):
    """What vLLM's last-resort handler answers for an exception its routes raise (status by the exception's
    type), without the dropped connection that follows it there."""
    from fastapi.responses import JSONResponse
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    answer = create_error_response(err)
    return JSONResponse(answer.model_dump(), status_code=answer.error.code)


def guarded(dispatch):
    """An HTTP middleware (`async def f(request, call_next)`) that answers every exception instead of letting it
    escape: one raised by the app inside (vLLM's routes) as vLLM's last-resort handler would, one raised by
    the middleware itself (after the body has been validated: a bug, not the client's fault) as a 500.
    Both are logged with their traceback."""

    @functools.wraps(dispatch)
    async def middleware(request, call_next):
        async def call_app(req):
            try:
                return await call_next(req)
            except Exception as err:
                logger.exception("%s %s: the app raised", req.method, req.url.path)
                return _app_error(err)

        try:
            return await dispatch(request, call_app)
        except Exception as err:
            logger.exception("%s %s: %s raised", request.method, request.url.path, dispatch.__name__)
            return _internal_error(err)

    return middleware
