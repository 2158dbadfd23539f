"""The weight routes of a BD3 server and their client: `POST /bd3/update_weights {"path", "version"}` loads a
checkpoint into the running engine with the same strict checks as loading; `GET /bd3/weight_info` answers
the weights' version label. `weight_routes` is an HTTP middleware for `vllm serve --middleware`."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from vllm_backend.server.validate import error_response
from vllm_backend.worker.weights import (NO_EXTENSION, WeightUpdateError, check_version, missing_extension,
                                         bd3_config, check_source)

UPDATE_ROUTE = "/bd3/update_weights"
INFO_ROUTE = "/bd3/weight_info"

_UPDATE_LOCK: asyncio.Lock | None = None  # one update at a time; made on the server's event loop


def parse_update_request(body: bytes) -> tuple[str, str]:
    """`{"path": str, "version": str}` and nothing else."""
    try:
        raw = json.loads(body or b"null")
    except ValueError:
        raise ValueError("the body must be a JSON object {\"path\": ..., \"version\": ...}") from None
    if not isinstance(raw, dict):
        raise ValueError("the body must be a JSON object {\"path\": ..., \"version\": ...}")
    unknown = sorted(set(raw) - {"path", "version"})
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    path = raw.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty string, got {path!r}")
    return path, check_version(raw.get("version"))


def _rpc_message(err: Exception) -> str:
    """vLLM wraps a worker's exception as 'Call to collective_rpc method failed: <message>'."""
    return str(err).split(" method failed: ", 1)[-1].splitlines()[0] if str(err) else type(err).__name__


async def weight_routes(request, call_next):
    """HTTP middleware for `vllm serve --middleware vllm_backend.server.weight_routes.weight_routes`."""
    route = (request.method, request.url.path)
    if route == ("GET", INFO_ROUTE):
        from fastapi.responses import JSONResponse

        return JSONResponse({"weight_version": await request.app.state.engine_client.get_weight_version()})
    if route != ("POST", UPDATE_ROUTE):
        return await call_next(request)
    vllm_config = request.app.state.vllm_config
    try:
        path, version = parse_update_request(await request.body())
        check_source(path, bd3_config(vllm_config))
    except (ValueError, WeightUpdateError) as err:  # CheckpointError is a ValueError
        return error_response(str(err))
    return await _update(request.app.state.engine_client, str(Path(path).expanduser().resolve()), version)


async def _update(engine, path: str, version: str):
    from fastapi.responses import JSONResponse

    global _UPDATE_LOCK
    _UPDATE_LOCK = _UPDATE_LOCK or asyncio.Lock()
    async with _UPDATE_LOCK:
        # Requests in flight finish on the weights they started with; new ones wait for the update.
        await engine.pause_generation(mode="wait")
        try:
            counts = await engine.collective_rpc("bd3_update_weights", args=(path,))
            await engine.update_weight_version(version)
        except Exception as err:  # the worker's strict check (a file changed since the front end read it)
            return error_response(NO_EXTENSION if missing_extension(err) else _rpc_message(err))
        finally:
            await engine.resume_generation()
    return JSONResponse({"weight_version": version, "tensors": counts[0]})


def update_server_weights(base_url: str, path: str | Path, version: str, timeout: float = 600.0) -> dict:
    """Client of `POST /bd3/update_weights`; `path` is read by the server, on its own filesystem."""
    import requests

    r = requests.post(base_url.rstrip("/") + UPDATE_ROUTE, json={"path": str(path), "version": version},
                      timeout=timeout)
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise WeightUpdateError(f"{r.status_code}: {message}")
    return r.json()


def server_weight_version(base_url: str, timeout: float = 30.0) -> str:
    import requests

    r = requests.get(base_url.rstrip("/") + INFO_ROUTE, timeout=timeout)
    r.raise_for_status()
    return r.json()["weight_version"]
