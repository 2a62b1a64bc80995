"""The keep-alive pool of one server: its idle connections, newest first.

Pure bookkeeping, no sockets: an entry older than the group's keepalive_timeout is closed
instead of reused (checked lazily on ``take``, and by the owner's periodic ``expire`` so
descriptors are not held forever). What it holds is anything ``Idle`` (the proxy's
``proxy.upstream.UpstreamConnection``), so the server state in ``core.snapshot`` owns a pool
without the core importing the I/O layer.
"""

from __future__ import annotations

from typing import Protocol


class Idle(Protocol):
    """A connection as its pool sees it."""

    closed: bool  # closed, or closing: never handed out again
    idle_since: float  # loop time it was put back
    reused: bool  # taken from a pool: a reset then means "stale", not "dead"

    def close(self) -> None: ...


class Pool:
    """Idle keep-alive connections to one server."""

    __slots__ = ("idle",)

    def __init__(self) -> None:
        self.idle: list[Idle] = []

    def take(self, now: float, max_idle_time: float) -> Idle | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since >= max_idle_time:
                conn.close()
                continue
            conn.reused = True
            return conn
        return None

    def put(self, conn: Idle, now: float, max_size: int) -> None:
        """Keep ``conn`` for reuse (its user has let go of it), or close it: closed already,
        or the pool is full."""
        if conn.closed or len(self.idle) >= max_size:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def expire(self, now: float, max_idle_time: float) -> None:
        keep = []
        for conn in self.idle:
            if conn.closed:
                continue
            if now - conn.idle_since >= max_idle_time:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle = []
