"""One replica of `bd3 serve CKPT --ray-replicas N`: Ray Serve's LLM server (`ray.serve.llm`), answering
HTTP with vLLM's own app and the middleware of `bd3 serve` (validation, traces, /bd3 weight routes, the API
key), plus what N replicas need that one server does not:

- every response names its replica in the `x-bd3-replica` header (Serve's replica id, host and pid);
- a weight update answered 200 by one replica reaches all of them. The replica publishes it (path, version)
  to the deployment's `WeightLog` actor before its 200 leaves; every replica compares its last applied
  update with the log's before it serves a request and loads what it lacks first, with the update route's
  own checks. A replica that Serve restarts after a crash loads the latest update before its first answer.
"""
from __future__ import annotations

import asyncio
import os
from http import HTTPStatus

import ray
from ray import serve
from ray.serve.llm.deployment import LLMServer

from vllm_backend.server.guard import error_response
from vllm_backend.server.weight_routes import UPDATE_ROUTE, checked_update, parse_update_request, update_root

REPLICA_HEADER = "x-bd3-replica"


class WeightLog:
    """The latest weight update a replica of the deployment answered 200 for: (number, path, version),
    numbered from 1; (0, "", "") before any."""

    def __init__(self) -> None:
        self.entry = (0, "", "")

    def latest(self) -> tuple[int, str, str]:
        return self.entry

    def publish(self, path: str, version: str) -> int:
        self.entry = (self.entry[0] + 1, path, version)
        return self.entry[0]


class BD3Replica(LLMServer):
    """`ray.serve.llm`'s LLMServer with the replica header and the weight log (deployed as an ASGI ingress)."""

    async def __init__(self, llm_config, *, weights, **kwargs) -> None:
        await super().__init__(llm_config, **kwargs)
        self.weights = weights
        self.applied = 0  # the number of the last update in the log that this replica has loaded
        self.lock = asyncio.Lock()
        self.name = f"{serve.get_replica_context().replica_id.unique_id}@{os.uname().nodename}:{os.getpid()}"
        self.state = None

    async def __serve_build_asgi_app__(self):
        app = await super().__serve_build_asgi_app__()
        app.add_middleware(ReplicaMiddleware, replica=self)  # outermost of the user middleware
        self.state = app.state
        return app

    async def catch_up(self) -> str | None:
        """Load the log's latest update if this replica lacks it; the error's message if it cannot."""
        number, path, version = await self.weights.latest.remote()
        if number == self.applied:
            return None
        async with self.lock:
            number, path, version = await self.weights.latest.remote()
            if number == self.applied:
                return None
            answer = await checked_update(self.state, update_root(), path, version)
            if answer.status_code != HTTPStatus.OK:
                return f"replica {self.name} cannot load weight update {version!r} ({path}): {answer.body.decode()}"
            self.applied = number
        return None

    async def published(self, body: bytes) -> None:
        """This replica answered the update in `body` with 200: it goes into the log before the answer leaves."""
        path, version = parse_update_request(body)
        async with self.lock:
            self.applied = await self.weights.publish.remote(path, version)


class ReplicaMiddleware:
    """ASGI middleware of a replica: catch up with the weight log, name the replica, publish updates."""

    def __init__(self, app, replica: BD3Replica) -> None:
        self.app = app
        self.replica = replica
        self.header = (REPLICA_HEADER.encode(), replica.name.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        problem = await self.replica.catch_up()
        if problem:  # never an answer from weights other than the deployment's latest
            return await error_response(problem, None, HTTPStatus.SERVICE_UNAVAILABLE, "ServiceUnavailableError")(
                scope, receive, named)
        route = scope["path"].removeprefix(scope.get("root_path", ""))
        if (scope["method"], route) != ("POST", UPDATE_ROUTE):
            return await self.app(scope, receive, named)
        body = await _read_body(receive)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        held = []

        async def hold(message):
            held.append(message)

        await self.app(scope, replay, hold)
        if held and held[0]["type"] == "http.response.start" and held[0]["status"] == HTTPStatus.OK:
            await self.replica.published(body)
        for message in held:
            await named(message)


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return b"".join(chunks)


def weight_log():
    """A new weight log for a deployment (an actor that takes no CPU)."""
    return ray.remote(num_cpus=0)(WeightLog).remote()
