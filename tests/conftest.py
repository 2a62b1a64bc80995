"""Shared fixtures: backend and proxy factories that clean up after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from aiohttp import web

from lbproxy.control.app import Proxy
from tests.support import Backend, backend_app, start_proxy


@pytest.fixture
async def make_backend() -> AsyncIterator[Callable[..., Awaitable[Backend]]]:
    """``await make_backend("A")``: a started backend named A on a free port (``app`` builds
    another kind of backend app from the name)."""
    started: list[Backend] = []

    async def make(
        name: str,
        port: int = 0,
        app: Callable[[str], web.Application] = backend_app,
        host: str = "127.0.0.1",
    ) -> Backend:
        b = await Backend(app(name), port, host).start()
        started.append(b)
        return b

    yield make
    for b in started:
        await b.stop()


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Awaitable[Proxy]]]:
    """``await make_proxy(config_doc(...))``: a started proxy, closed after the test."""
    started: list[Proxy] = []

    async def make(doc: Any, path: str | None = None) -> Proxy:
        p = await start_proxy(doc, path)
        started.append(p)
        return p

    yield make
    for p in started:
        await p.close(timeout=0.5)


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    """Tests run on uvloop, as the proxy does in production (transport.set_protocol etc.)."""
    return {"uvloop": uvloop.new_event_loop}
