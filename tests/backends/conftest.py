"""Fixtures for the chat backend tests: a real, restartable redis-server per test.

``redis_server`` starts ``redis-server`` on a free port (no persistence) and stops it
after the test; ``RedisServer.stop()/start()/restart()`` (and their ``*_async`` forms,
which don't block the event loop) bounce it on the *same* port. A missing
``redis-server`` binary is a test failure, not a skip.

Every test in this directory gets a 30 s timeout unless it sets its own; each one is
expected to take a few seconds at most.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.backends.redis_server import REDIS_MISSING, RedisServer, find_redis_server, free_port


def _new_redis_server(tmp_path: Path) -> RedisServer:
    binary = find_redis_server()
    if binary is None:
        pytest.fail(REDIS_MISSING, pytrace=False)
    return RedisServer(binary, free_port(), tmp_path)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server on a free port, stopped after the test."""
    server = _new_redis_server(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server_stopped(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server on a free port, *not* started yet (call ``start``/``start_async``)."""
    server = _new_redis_server(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def restart_redis(redis_server: RedisServer) -> Callable[[], Awaitable[None]]:
    """``await restart_redis()`` stops ``redis_server`` and starts it again on the same port."""
    return redis_server.restart_async


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(30))
