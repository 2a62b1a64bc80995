"""Fixtures shared by integration test modules: the multi-worker harness (``start_lbproxy``,
defined with its helpers in test_workers.py) for the modules that run ``--workers``, and
``make_admin``: an admin server on a started proxy, closed after the test."""

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from lbproxy.control.admin import AdminServer
from lbproxy.control.app import Proxy
from tests.integration.test_workers import start_lbproxy

__all__ = ["make_admin", "start_lbproxy"]


@pytest.fixture
async def make_admin() -> AsyncIterator[Callable[[Proxy], Awaitable[AdminServer]]]:
    started: list[AdminServer] = []

    async def make(proxy: Proxy) -> AdminServer:
        admin = AdminServer(proxy)
        await admin.start()
        started.append(admin)
        return admin

    yield make
    for a in started:
        await a.close()
