"""Session-wide fixtures for the expensive things: one process for every vLLM engine (tests/engines.py) and
one `bd3 serve` on tiny-bd3-L4 for every server test. They, and the slow commands that tests read with
`@early_fixture` (tests/early.py), start in a background thread as soon as the selected tests are known;
the modules that need them run last, so that the other tests run meanwhile.

Markers say what a test starts (pyproject.toml): `engine`, `server`, `cluster`, `cli`. The fast tier for
edits is `pytest -m "not engine and not server and not cluster"`."""
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).parent))

import early  # noqa: E402
from early import early_fixture  # noqa: E402
from engines import EngineProcess  # noqa: E402
from servers import LAUNCHED, launch, stop, wait_healthy  # noqa: E402

# Hypothesis profiles (the fuzz suite, tests/test_vllm_fuzz.py). The default one draws the same bodies on every
# run and machine (derandomize, no example database), 150 per route: 18 s on 2 idle cores, 32 s on busy ones;
# `long` (`pytest --hypothesis-profile=long`) draws fresh ones, 1,500 per route. No deadline: a body's time is
# the server's, and the server is shared with whatever else runs.
settings.register_profile("default", max_examples=150, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", settings.get_profile("default"), max_examples=1500, derandomize=False)

BD3 = str(Path(sys.executable).with_name("bd3"))
SERVER_KEY = "bd3-test-key"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the tiny tokenizer has no chat template
# The engine runs this many requests at once and vLLM admits this many in flight (running or waiting; more are
# a 503): small, so that tests/test_vllm_overload.py bursts far past both in a few seconds.
MAX_NUM_SEQS = 32
MAX_NUM_QUEUED_REQS = 128
ENGINE_PROCESSES: list = []  # stopped when the session ends, with the servers


def pytest_configure(config):
    import torch

    # One thread per process unless OMP_NUM_THREADS says otherwise, here and in every process the tests start
    # (servers, the engine process, lm_eval, Ray workers): these run beside each other on few cores, and
    # OpenMP threads that outnumber the cores wait on each other, slowing the tiny models' passes tenfold.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # BD3_TEST_DEVICE=cuda runs the core's tests with CUDA as torch's default device (bench/gpu_check.sh):
    # tensors the tests build land there, while the per-row random generators stay on the CPU.
    device = os.environ.get("BD3_TEST_DEVICE")
    if device and device != "cpu":
        torch.set_default_device(device)


def pytest_report_header(config):
    return f"bd3 test device: {os.environ.get('BD3_TEST_DEVICE') or 'cpu'}"


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    """Start the early fixtures that the selected tests request, in the order they were defined, and run the
    modules that read them last, ordered by the last early fixture each one needs: the other tests run
    while the early ones get ready."""
    rank = {name: i for i, name in enumerate(early.names())}
    def unmarked(fixtures: set, marks: tuple) -> list[str]:
        return [item.nodeid for item in items if fixtures & set(getattr(item, "fixturenames", ()))
                and not any(item.get_closest_marker(m) for m in marks)]

    # The markers decide the tiers, so a test that starts something must say so.
    wrong = (unmarked({"engines", "engine_process", "bd3_server", "bd3_server_process"}, ("engine", "server"))
             + unmarked(set(rank), ("engine", "server", "cluster", "cli")))
    if wrong:
        raise pytest.UsageError(f"mark by what they start (engine, server, cluster, cli): {', '.join(wrong)}")
    last: dict[str, int] = {}  # module -> rank of the last early fixture it needs
    for item in items:
        module = item.nodeid.split("::")[0]
        for name in getattr(item, "fixturenames", ()):
            if name in rank:
                last[module] = max(last.get(module, -1), rank[name])
    needed = sorted({n for item in items for n in getattr(item, "fixturenames", ()) if n in rank}, key=rank.get)
    items[:] = sorted(items, key=lambda item: last.get(item.nodeid.split("::")[0], -1))  # stable: modules stay whole
    if not config.option.collectonly:
        for name in needed:
            early.start(name, config._tmp_path_factory.mktemp(name))


def pytest_sessionfinish(session):
    early.shutdown()
    for process in ENGINE_PROCESSES:
        process.close()
    for proc, log in LAUNCHED:
        stop(proc, log)


@early_fixture
def engine_process(folder):
    process = EngineProcess(folder / "engines.log")
    ENGINE_PROCESSES.append(process)
    return process.start()


@pytest.fixture(scope="session")
def engines(engine_process):
    """Runs engine jobs (tests/vllm_jobs.py) in one process."""
    return engine_process


def _server_argv(port: int, weight_root: Path) -> list[str]:
    from bd3_plugin.tinyworld.data import checkpoint_path

    return [BD3, "serve", str(checkpoint_path(4)), "--port", str(port), "--weight-update-root", str(weight_root),
            "--", "--api-key", SERVER_KEY, "--logprobs-mode", "processed_logprobs", "--chat-template", CHAT_TEMPLATE,
            "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-queued-reqs", str(MAX_NUM_QUEUED_REQS)]


@early_fixture(order=1)  # after the commands: an idle vLLM server still takes some CPU
def bd3_server_process(folder):
    from bd3_plugin.tinyworld.data import checkpoint_path

    # The update route reads only under pytest's base temporary folder, which holds every tmp_path and
    # mktemp folder of the session; the served checkpoint is copied there so that tests can put it back.
    root = folder.parent
    served = shutil.copytree(checkpoint_path(4), folder / checkpoint_path(4).name)
    proc, base, log = launch(lambda port: _server_argv(port, root), folder)
    wait_healthy(proc, base, log)
    return SimpleNamespace(base=base, weight_root=root, served_weights=served)


@pytest.fixture(scope="session")
def bd3_server(bd3_server_process):
    """`bd3 serve tiny-bd3-L4` for every test that talks to a server, with the flags any of them needs: an API
    key (requests to /v1 and /bd3 carry `headers`), processed logprobs, a chat template, `max_num_seqs` and
    `max_num_queued_reqs`, and the weight-update route reading under `weight_root` (pytest's base temporary
    folder). A test that updates the weights puts back `served_weights` (tiny-bd3-L4, copied inside the root)
    and the label "default" before it ends."""
    from bd3_plugin.tinyworld.data import checkpoint_path

    return SimpleNamespace(base=bd3_server_process.base, model=str(checkpoint_path(4)), key=SERVER_KEY,
                           headers={"Authorization": f"Bearer {SERVER_KEY}"}, max_num_seqs=MAX_NUM_SEQS,
                           max_num_queued_reqs=MAX_NUM_QUEUED_REQS,
                           weight_root=bd3_server_process.weight_root,
                           served_weights=bd3_server_process.served_weights)
