"""A stand-in for the Hugging Face hub on 127.0.0.1: folders served as model repos under `org/name` ids, over
the endpoints that huggingface_hub 2.5 and vLLM 0.32 call for a model repo (read from their source):

- `HEAD|GET /{repo}/resolve/{revision}/{path}` (hf_hub_download, file_exists, safetensors metadata with a
  Range): X-Repo-Commit, ETag and Content-Length; a 404 says why in X-Error-Code (RepoNotFound,
  RevisionNotFound, EntryNotFound, the last with X-Repo-Commit, which hf_hub_download caches);
- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{revision}` (model_info, repo_info,
  resolve_revision, HfFileSystem): id, sha and siblings;
- `GET /api/models/{repo}/tree/{revision}[/{path}]` (list_repo_tree, list_repo_files, snapshot_download,
  HfFileSystem.ls): one page of {type, path, oid, size}.

A repo has one revision, `main`, whose commit hash is derived from its files. Clients are pointed at it with
HF_ENDPOINT and an empty HF_HOME; `pointed_at` does that in a process that has already imported the hub
client, which reads both once, at import."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")


class Repo:
    def __init__(self, folder: Path) -> None:
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
                      if p.is_file()}
        self.oids = {name: hashlib.sha1(data).hexdigest() for name, data in self.files.items()}
        self.sha = hashlib.sha1(json.dumps(self.oids, sort_keys=True).encode()).hexdigest()

    def has_revision(self, rev: str) -> bool:
        return rev in ("main", self.sha)


class FakeHub:
    """`with FakeHub({"org/name": folder}) as hub:` serves the folders at `hub.url`; `hub.requests` records
    (method, path, authorization header) of every request."""

    def __init__(self, repos: dict[str, Path], port: int = 0) -> None:
        self.repos = {repo_id: Repo(Path(folder)) for repo_id, folder in repos.items()}
        self.requests: list[tuple[str, str, str | None]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: the tests read hub.requests
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("authorization")))
            for pattern, serve in ((_RESOLVE, self._resolve), (_TREE, self._tree), (_API, self._info)):
                match = pattern.match(path)
                if match:
                    repo = hub.repos.get(match["repo"])
                    rev = match["rev"] or "main"
                    if repo is None:
                        return self._send(404, b"", {"X-Error-Code": "RepoNotFound"}, body)
                    if not repo.has_revision(rev):
                        return self._send(404, b"", {"X-Error-Code": "RevisionNotFound"}, body)
                    return serve(match, repo, body)
            self._send(404, b"", {}, body)

        def _resolve(self, match, repo: Repo, body: bool) -> None:
            name = match["path"]
            commit = {"X-Repo-Commit": repo.sha}
            if name not in repo.files:
                return self._send(404, b"", commit | {"X-Error-Code": "EntryNotFound"}, body)
            data = repo.files[name]
            headers = commit | {"ETag": f'"{repo.oids[name]}"', "Accept-Ranges": "bytes"}
            wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("range", ""))
            if wanted:  # safetensors metadata: the first bytes of the file
                first = int(wanted[1])
                last = min(int(wanted[2] or len(data) - 1), len(data) - 1)
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                return self._send(206, data[first:last + 1], headers, body)
            self._send(200, data, headers, body)

        def _info(self, match, repo: Repo, body: bool) -> None:
            info = {"id": match["repo"], "modelId": match["repo"], "sha": repo.sha, "private": False,
                    "siblings": [{"rfilename": name} for name in repo.files]}
            self._json(info, body)

        def _tree(self, match, repo: Repo, body: bool) -> None:
            prefix = (match["path"] or "").strip("/")
            entries = [{"type": "file", "path": name, "oid": repo.oids[name], "size": len(data)}
                       for name, data in repo.files.items() if not prefix or name.startswith(prefix + "/")]
            if prefix and not entries:
                return self._send(404, b"", {"X-Repo-Commit": repo.sha, "X-Error-Code": "EntryNotFound"}, body)
            self._json(entries, body)

        def _json(self, payload, body: bool) -> None:
            self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)

        def _send(self, status: int, data: bytes, headers: dict, body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


@contextmanager
def pointed_at(url: str, home: Path, offline: bool = False):
    """huggingface_hub in this process (and vLLM's cached hub client and file listings, if vLLM is imported)
    talking to `url` with its cache under `home`, as a fresh process started with HF_ENDPOINT=url,
    HF_HOME=home and HF_HUB_OFFLINE unset (or 1) would; everything is put back on exit."""
    from huggingface_hub import constants

    names = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
    saved = {name: getattr(constants, name) for name in names}
    env = {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1" if offline else "0"}
    saved_env = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    constants.ENDPOINT = url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = url + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HOME = str(home)
    constants.HF_HUB_CACHE = str(Path(home) / "hub")
    constants.HF_HUB_OFFLINE = offline
    _forget_vllm_hub_state()
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(constants, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _forget_vllm_hub_state()


def _forget_vllm_hub_state() -> None:
    """vLLM keeps one HfApi (its endpoint fixed when built) and caches file listings by repo id."""
    repo_utils = sys.modules.get("vllm.transformers_utils.repo_utils")
    if repo_utils is None:
        return
    repo_utils._hf_api = None
    repo_utils.list_repo_files.cache_clear()
    repo_utils._snapshot_non_weight_files.cache_clear()


def main(argv: list[str]) -> None:
    """`python tests/fake_hub.py [--port N] org/name=FOLDER ...`: serve until interrupted."""
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 0
    pairs = [a.split("=", 1) for a in argv if "=" in a]
    hub = FakeHub({repo_id: Path(folder) for repo_id, folder in pairs}, port)
    print(hub.url, flush=True)
    hub.server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
