"""The weight routes of a BD3 server and their client: `POST /bd3/update_weights {"path", "version"}` loads a
checkpoint into the running engine with the same strict checks as loading; `GET /bd3/weight_info` answers
the weights' version label. `weight_routes` is an HTTP middleware for `vllm serve --middleware`.

Every /bd3 route takes the server's API key (vLLM's `--api-key` / `VLLM_API_KEY`, as on /v1), checked before
the body is read. The update route exists only when the server was started with a weight-update root
(`bd3 serve --weight-update-root DIR`, which sets `BD3_WEIGHT_UPDATE_ROOT`), and reads nothing outside it.
"""
from __future__ import annotations

import asyncio
import os
from http import HTTPStatus
from pathlib import Path

from bd3_plugin.core.checkpoint import CONFIG, WEIGHTS

from vllm_backend.server.guard import authenticated, error_response, guarded, json_body, route_path, unauthorized
from vllm_backend.server.serve import WEIGHT_ROOT_ENV
from vllm_backend.worker.weights import (NO_EXTENSION, WeightUpdateError, check_version, missing_extension,
                                         bd3_config, check_source)

PREFIX = "/bd3"
UPDATE_ROUTE = "/bd3/update_weights"
INFO_ROUTE = "/bd3/weight_info"
# One answer for every path outside the root, whether or not it exists: the route tells nothing about the disk.
OUTSIDE_ROOT = "path must lie inside the server's weight-update root {} once links and '..' are resolved"

_UPDATE_LOCK: asyncio.Lock | None = None  # one update at a time; made on the server's event loop


def update_root() -> Path | None:
    """The folder the update route reads under; None (the default) leaves the route out."""
    root = os.environ.get(WEIGHT_ROOT_ENV)
    return Path(root).resolve() if root else None


def inside_root(path: str, root: Path) -> Path | None:
    """`path` (a relative one is read under `root`) resolved, when it and each file an update reads from it
    lie inside `root` (resolved) once links and `..` are resolved; None otherwise. A path that names
    somewhere outside `root` before any link is followed is refused without touching the disk."""
    named = Path(os.path.normpath(root / path))
    if not named.is_relative_to(root):
        return None
    try:
        resolved = named.resolve()
        read = [resolved / WEIGHTS, resolved / CONFIG] if resolved.is_dir() else []
        if all(p.resolve().is_relative_to(root) for p in [resolved, *read]):
            return resolved
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte: nothing to read
        pass
    return None


def parse_update_request(body: bytes) -> tuple[str, str]:
    """`{"path": str, "version": str}` and nothing else."""
    try:
        raw = json_body(body) if body else None
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


@guarded
async def weight_routes(request, call_next):
    """HTTP middleware for `vllm serve --middleware vllm_backend.server.weight_routes.weight_routes`."""
    route = route_path(request)
    if request.method == "OPTIONS" or not (route == PREFIX or route.startswith(PREFIX + "/")):
        return await call_next(request)  # vLLM's key check skips OPTIONS (CORS preflight) too
    if not authenticated(request):
        return unauthorized()
    if (request.method, route) == ("GET", INFO_ROUTE):
        from fastapi.responses import JSONResponse

        return JSONResponse({"weight_version": await request.app.state.engine_client.get_weight_version()})
    root = update_root()
    if (request.method, route) != ("POST", UPDATE_ROUTE) or root is None:
        return await call_next(request)  # vLLM answers 404: no such route
    try:
        path, version = parse_update_request(await request.body())
    except ValueError as err:
        return error_response(str(err))
    return await checked_update(request.app.state, root, path, version)


async def checked_update(state, root: Path, path: str, version: str):
    """Load `path` (under `root`) into the engine of the app whose state is `state`, under the label `version`:
    the update route's checks and load, answered as the route answers (200, 400, 403). Also how the other
    replicas of a Ray Serve deployment load an update one of them answered (ray_jobs/replica.py)."""
    source = inside_root(path, root)
    if source is None:
        return error_response(OUTSIDE_ROOT.format(root), "path", HTTPStatus.FORBIDDEN, "PermissionDeniedError")
    try:
        check_source(source, bd3_config(state.vllm_config))
    except (ValueError, WeightUpdateError) as err:  # CheckpointError is a ValueError
        return error_response(str(err))
    return await _update(state.engine_client, str(source), version)


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


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def update_server_weights(base_url: str, path: str | Path, version: str, *, api_key: str | None = None,
                          timeout: float = 600.0) -> dict:
    """Client of `POST /bd3/update_weights`; `path` is read by the server, on its own filesystem, inside its
    weight-update root (a relative path is read under it)."""
    import requests

    r = requests.post(base_url.rstrip("/") + UPDATE_ROUTE, json={"path": str(path), "version": version},
                      headers=_headers(api_key), timeout=timeout)
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise WeightUpdateError(f"{r.status_code}: {message}")
    return r.json()


def server_weight_version(base_url: str, *, api_key: str | None = None, timeout: float = 30.0) -> str:
    import requests

    r = requests.get(base_url.rstrip("/") + INFO_ROUTE, headers=_headers(api_key), timeout=timeout)
    r.raise_for_status()
    return r.json()["weight_version"]
