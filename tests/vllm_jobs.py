"""The vLLM side of tests/engines.py, run as one subprocess for the whole test session: vLLM is imported once
and every job builds its own engine here, as one subprocess per engine did before.

Reads one job per line on stdin, {"kind", "spec", "env"}, runs `run(spec)` of the job's module with `env`
set, and answers one JSON line on the original stdout: {"result": ...} or {"error": traceback}. vLLM's own
output (and anything else printed) goes to stderr, which the test session keeps in a log file."""
import gc
import importlib
import json
import os
import sys
import traceback
from contextlib import contextmanager

JOBS = {"parity": "vllm_parity_worker", "fusion": "vllm_fusion_worker", "load": "vllm_load_worker",
        "traces": "vllm_traces_worker", "weights": "vllm_weights_worker", "llama": "vllm_llama_worker",
        "rl": "vllm_rl_worker", "hub": "vllm_hub_worker", "profile": "vllm_profile_worker",
        "sampler": "vllm_sampler_worker"}


_KEPT: dict = {}  # key -> (arguments, engine): engines that stay up for later jobs


@contextmanager
def engine(*args, keep: str | None = None, **kwargs):
    """A `vllm.LLM` that is shut down on exit (its KV cache freed, its processes ended), so that the next
    job's engine starts as in a fresh process. With `keep`, the engine stays up under that key instead and
    a later job that asks for the key (with the same arguments) gets it back."""
    from vllm import LLM

    if keep in _KEPT:
        built_with, llm = _KEPT[keep]
        assert built_with == (args, kwargs), f"engine {keep!r} was built with {built_with}, not {(args, kwargs)}"
        yield llm
        return
    llm = LLM(*args, **kwargs)
    if keep is not None:
        _KEPT[keep] = ((args, kwargs), llm)
        yield llm
        return
    try:
        yield llm
    finally:
        _shutdown(llm)


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@contextmanager
def patched(owner, name: str, value):
    """`owner.name = value` for the duration of one job (an inherited attribute is inherited again after)."""
    own = name in owner.__dict__
    original = owner.__dict__.get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


@contextmanager
def environment(env: dict):
    """Environment variables for one job; vLLM caches its variables once an engine has started, so the
    cache is dropped for the job to read them."""
    import vllm.envs

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    vllm.envs.disable_envs_cache()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        vllm.envs.disable_envs_cache()


def serve() -> None:
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # vLLM's logs and every print go to stderr
    from vllm import LLM  # noqa: F401 - imported once, before the first job

    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        job = json.loads(line)
        try:
            with environment(job.get("env", {})):
                answer = {"result": importlib.import_module(JOBS[job["kind"]]).run(job["spec"])}
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: B036 - a job's sys.exit is its failure, not the server's
            answer = {"error": traceback.format_exc()}
        gc.collect()
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    for _, llm in _KEPT.values():
        _shutdown(llm)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process unless a job asks
    serve()
