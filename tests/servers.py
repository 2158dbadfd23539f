"""Start and stop an OpenAI-compatible server process in tests, every wait bounded."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests


LAUNCHED: list = []  # (process, log) of every server started, for the session's end to stop those still up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, log_dir):
    """Start a server process (`argv(port)`) without waiting for it: (process, base url, log file)."""
    port = free_port()
    log = (Path(log_dir) / "server.log").open("w")
    proc = subprocess.Popen(argv(port), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    LAUNCHED.append((proc, log))
    return proc, f"http://127.0.0.1:{port}", log


def wait_healthy(proc, base, log, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or not answering yet
            pass
        time.sleep(1)
    pytest.fail("server did not become healthy")


def stop(proc, log) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # stop it by its PID (and its engine process)
        proc.wait(timeout=60)
    log.close()


def vllm_app(*vllm_args: str):
    """vLLM's OpenAI-server app with the middleware `bd3 serve` adds, built in this process with no engine
    behind it: for what the server answers before a request reaches the engine. Drive it with Starlette's
    TestClient, which raises any exception that escapes the app (one that would drop the connection)."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_backend.server.serve import MIDDLEWARE

    argv = [*vllm_args, *(a for m in MIDDLEWARE for a in ("--middleware", m))]
    return build_app(make_arg_parser(FlexibleArgumentParser()).parse_args(argv), ("generate",))
