"""The config.json of the model vLLM is asked to start, read before vLLM builds its config: from a local
folder, or for a hub id from the Hugging Face cache, else from the hub, with huggingface_hub's
`hf_hub_download` as vLLM reads it (HF_ENDPOINT, HF_HUB_OFFLINE, the revision and token vLLM was given). A
BD3 hub id not yet downloaded is then configured like a local folder, instead of being left to vLLM's stock
runner."""
from __future__ import annotations

import json
from pathlib import Path

CONFIG = "config.json"


class ConfigUnreadable(Exception):
    """A hub id whose config.json could not be read; the message is one line saying why."""


def read_model_config(model: str, revision: str | None = None, token: bool | str | None = None) -> dict | None:
    """The parsed config.json of a folder or hub id; None where there is none to read: a folder or a repo
    without one, a file (e.g. a .gguf), a string that is neither a folder nor a hub id (vLLM's own error, or
    another loader's scheme, then applies), or a file that is not JSON. Raises ConfigUnreadable when a hub
    id's config could not be fetched (unknown repo or revision, no access, no network, offline and not
    cached): vLLM could not start it either."""
    local = Path(model).expanduser()
    if local.exists():
        path = local / CONFIG
        return _parse(path) if path.is_file() else None
    path = _cached_or_fetched(model, revision, token)
    return None if path is None else _parse(path)


def _parse(path: Path) -> dict | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _cached_or_fetched(repo_id: str, revision: str | None, token: bool | str | None) -> Path | None:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RemoteEntryNotFoundError

    try:
        cached = try_to_load_from_cache(repo_id, CONFIG, revision=revision)
    except HFValidationError:
        return None  # neither a folder nor a hub id
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:
        return None  # the cache knows the repo has no config.json (vLLM's file_or_path_exists reads it so too)
    try:
        return Path(hf_hub_download(repo_id, CONFIG, revision=revision, token=token))
    except RemoteEntryNotFoundError:
        return None  # the repo exists without a config.json: not a transformers-format BD3 checkpoint
    except Exception as err:  # the hub client raises many types; the user needs one line
        raise ConfigUnreadable(_reason(err, revision)) from None


def _reason(err: Exception, revision: str | None) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(err, GatedRepoError):
        return (f"a gated repository on {constants.ENDPOINT}: accept its terms there and pass a token "
                "(HF_TOKEN or --hf-token)")
    if isinstance(err, RepositoryNotFoundError):
        return (f"no such repository on {constants.ENDPOINT}, or a private one without a token "
                "(HF_TOKEN or --hf-token)")
    if isinstance(err, RevisionNotFoundError):
        return f"the repository has no revision {revision}"
    if isinstance(err, LocalEntryNotFoundError):
        if constants.HF_HUB_OFFLINE or isinstance(err.__cause__, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache"
        cause = err.__cause__
        why = f" ({type(cause).__name__})" if cause is not None else ""
        return f"{constants.ENDPOINT} could not be reached{why} and the file is not in the Hugging Face cache"
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
