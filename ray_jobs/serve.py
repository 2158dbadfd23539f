"""`bd3 serve CKPT --ray-replicas N`: the BD3 vLLM engine as N Ray Serve replicas behind one OpenAI-compatible
route, on a new local Ray instance or on a cluster (`--ray-address`).

Each replica is Ray's own LLM server (`ray.serve.llm`) deployed as an ASGI ingress, so an HTTP request
reaches vLLM's own app in the replica, with the same command line as `bd3 serve` (its defaults, the
middleware, `--api-key` and every further vLLM argument) and the replica's additions (ray_jobs/replica.py).
The command stays in the foreground; Ctrl-C (or SIGTERM) takes the deployment down."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

APP = "bd3"
DEPLOYMENT = "BD3Replica"
# What a replica needs from `bd3 serve`'s environment (vllm_backend.server.serve.environment).
REPLICA_ENV = ("VLLM_CPU_KVCACHE_SPACE", "TOKENIZERS_PARALLELISM", "VLLM_API_KEY")


def llm_config(checkpoint: str, kwargs: dict, replicas: int, resources: dict, weight_update_root: Path | None):
    """Ray Serve's LLMConfig for `bd3 serve`'s vLLM arguments `kwargs` (vllm_backend.server.serve.engine_kwargs;
    the host and port are Serve's, not a replica's)."""
    from ray.serve.llm import LLMConfig

    from vllm_backend.server.serve import WEIGHT_ROOT_ENV, environment

    kwargs = {k: v for k, v in kwargs.items() if k not in ("host", "port")}
    name = (kwargs.pop("served_model_name", None) or [checkpoint])[0]  # LLMConfig names the model itself
    env = {k: v for k, v in environment(weight_update_root).items() if k in REPLICA_ENV}
    # Always set: a replica of a local instance would otherwise inherit the variable from this process.
    env[WEIGHT_ROOT_ENV] = str(weight_update_root or "")
    gpu = "num_gpus" in resources
    # On CPU the engine runs in the replica's process: the engine's one-CPU bundle is the replica's CPU.
    deployment = {"num_replicas": replicas} | ({} if gpu else {"ray_actor_options": {"num_cpus": 0}})
    return LLMConfig(model_loading_config={"model_id": name, "model_source": checkpoint},
                     accelerator_config={"kind": "gpu" if gpu else "cpu"}, deployment_config=deployment,
                     engine_kwargs=kwargs, runtime_env={"env_vars": env})


def deploy(checkpoint: str, kwargs: dict, replicas: int, address: str | None,
           weight_update_root: Path | None) -> str:
    """Start (or join) Ray, deploy the replicas with `bd3 serve`'s vLLM arguments `kwargs`
    (vllm_backend.server.serve.engine_kwargs) and wait until every one answers; returns the route's base URL."""
    from ray_jobs.cluster import connect, one_device_each

    host, port = kwargs["host"], kwargs["port"]
    ray = connect(address, None)
    resources = one_device_each(ray, replicas, "--ray-replicas", "replica")
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    from ray_jobs.replica import BD3Replica, weight_log

    config = llm_config(checkpoint, kwargs, replicas, resources, weight_update_root)
    app = build_llm_deployment(config, deployment_cls=serve.ingress()(BD3Replica), name_prefix="",
                               override_serve_options={"name": DEPLOYMENT}, bind_kwargs={"weights": weight_log()})
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP, route_prefix="/")
    return f"http://{host}:{port}"


def _stop(signum, frame):
    raise KeyboardInterrupt


def serve_replicas(checkpoint: str, kwargs: dict, replicas: int, address: str | None,
                   weight_update_root: Path | None) -> None:
    """Deploy and stay in the foreground until interrupted."""
    try:
        base = deploy(checkpoint, kwargs, replicas, address, weight_update_root)
        signal.signal(signal.SIGTERM, _stop)  # after Ray's start, which installs a handler of its own
        print(f"bd3 serve: {replicas} Ray Serve replicas of {checkpoint} on {base} "
              f"(the x-bd3-replica header names the replica; Ctrl-C stops)", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        import ray
        from ray import serve

        from ray_jobs.cluster import disconnect

        # A joined cluster keeps its Serve and loses this app. A local instance stops whole with Ray: Serve's own
        # shutdown would first wait for every replica to stop gracefully, one that is still starting included.
        if address and ray.is_initialized():
            serve.delete(APP)
        disconnect()
