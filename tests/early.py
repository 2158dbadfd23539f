"""Slow, self-contained set-up (a server start, a command's run) begun in background threads as soon as the
tests that need it are selected, two pieces at a time in the order the tests need them: they run beside the
first tests, and each test waits only for what is not ready yet.

`@early_fixture` turns `fn(folder)` into a session fixture of the same name whose value is `fn`'s result;
`pytest_collection_modifyitems` in conftest.py starts every one that a selected test requests."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

# Two at a time: with the tests in this process, a 2-core machine stays busy even while a test waits. Set-up
# that starts a local Ray instance runs in a lane of its own, one at a time (each driver starts its own
# instance beside no other), so that it never holds one of the two threads waiting for another's instance;
# the Ray Serve scenario (tests/test_ray_serve.py), minutes long, has a lane of its own beside it.
_LANES = {None: ThreadPoolExecutor(max_workers=2, thread_name_prefix="bd3-tests-early"),
          "ray": ThreadPoolExecutor(max_workers=1, thread_name_prefix="bd3-tests-early-ray"),
          "serve": ThreadPoolExecutor(max_workers=1, thread_name_prefix="bd3-tests-early-serve")}
_LANE: dict[str, str | None] = {}
_MAKERS: dict[str, Callable[[Path], object]] = {}
_ORDER: dict[str, tuple[int, int]] = {}
_STARTED: dict[str, Future] = {}
TIMEOUT = 1800  # s; each maker bounds its own waits, this only keeps a hung thread from hanging the session


def start(name: str, folder: Path) -> None:
    if name in _MAKERS and name not in _STARTED:
        _STARTED[name] = _LANES[_LANE[name]].submit(_MAKERS[name], folder)


def result(name: str, folder: Path):
    start(name, folder)
    return _STARTED[name].result(timeout=TIMEOUT)


def names() -> list[str]:
    """Every early fixture, in the order they start: by `order`, then as defined (conftest.py's first)."""
    return sorted(_MAKERS, key=lambda name: _ORDER[name])


def shutdown() -> None:
    """Drop what has not started; wait for what has (each maker bounds its own waits)."""
    for pool in _LANES.values():
        pool.shutdown(wait=True, cancel_futures=True)


def early_fixture(fn: Callable[[Path], object] | None = None, *, order: int = 0, lane: str | None = None):
    """A session fixture `fn.__name__` whose value is `fn(folder)`, computed in the background thread.
    `@early_fixture(order=1)` starts after the order-0 ones (a server, which costs CPU while it waits);
    `@early_fixture(lane="ray")` for set-up that starts a local Ray instance or cluster."""
    if fn is None:
        return lambda f: early_fixture(f, order=order, lane=lane)
    _MAKERS[fn.__name__] = fn
    _LANE[fn.__name__] = lane
    _ORDER[fn.__name__] = (order, len(_ORDER))

    @pytest.fixture(scope="session", name=fn.__name__)
    def fixture(tmp_path_factory):
        return result(fn.__name__, tmp_path_factory.mktemp(fn.__name__))

    return fixture
