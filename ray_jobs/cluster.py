"""Start or join Ray, the same way for every command that uses it (`bd3-sweep`, `bd3 rl --rollout-workers`)."""
from __future__ import annotations

import socket
import sys


class ClusterError(RuntimeError):
    """Ray cannot be started or joined (the message is for the user)."""


def check_reachable(address: str) -> None:
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {err}") from None


def connect(address: str | None, num_cpus: int | None):
    import ray

    if address:
        check_reachable(address)
    try:
        # "local" always starts a new instance: None would join RAY_ADDRESS or the last cluster recorded in
        # Ray's temp folder, which may be stale (ray._private.services.canonicalize_bootstrap_address).
        ray.init(address=address or "local", num_cpus=None if address else num_cpus, include_dashboard=False,
                 ignore_reinit_error=True, log_to_driver=False, configure_logging=False)
    except Exception as err:
        raise ClusterError(f"cannot start or join Ray ({address or 'local'}): {err}".splitlines()[0]) from None
    return ray


def one_device_each(ray, count: int, flag: str, what: str) -> dict:
    """Ray resources for `count` actors of one device each: a GPU on a cluster with GPUs, else a CPU. A
    number the cluster cannot hold is refused (its actors would wait for resources forever)."""
    total = ray.cluster_resources()
    kind = "GPU" if total.get("GPU", 0) >= 1 else "CPU"
    have = int(total.get(kind, 0))
    if have < count:
        raise ClusterError(f"{flag} {count} needs {count} {kind}s (one per {what}); the Ray cluster has {have}")
    return {"num_gpus": 1} if kind == "GPU" else {"num_cpus": 1}


def disconnect() -> None:
    """Leave Ray if this process started or joined it (a local instance stops), and with it the thread that
    prints Ray's reports."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
