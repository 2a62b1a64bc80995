"""The keep-alive pool of one server: its idle connections, newest first.

Pure bookkeeping, no sockets: an entry older than the group's keepalive_timeout is closed
instead of reused (checked lazily on ``take``, and by the owner's periodic ``expire`` so
descriptors are not held forever). What it holds is anything ``Idle`` (the proxy's
``proxy.upstream.UpstreamConnection``), so the server state in ``core.snapshot`` owns a pool
without the core importing the I/O layer.

Each connection carries a ``key``: what it was opened with beyond the server (its TLS
settings, the PROXY protocol header it started with). ``take`` hands out only one whose key
is the one asked for, so a connection that began with one client's PROXY header is never
reused for another client, and one opened before a reload changed the group's TLS is not
reused after it. Most groups use the one key ``""``.
"""

from __future__ import annotations

from typing import Protocol


class Idle(Protocol):
    """A connection as its pool sees it."""

    closed: bool  # closed, or closing: never handed out again
    idle_since: float  # loop time it was put back
    reused: bool  # taken from a pool: a reset then means "stale", not "dead"
    key: str  # what it was opened with beyond the server ("" for most groups)

    def close(self) -> None: ...


class Pool:
    """Idle keep-alive connections to one server."""

    __slots__ = ("idle",)

    def __init__(self) -> None:
        self.idle: list[Idle] = []

    def take(self, now: float, max_idle_time: float, key: str = "") -> Idle | None:
        """The newest idle connection opened with ``key``, or None; expired ones are closed
        on the way."""
        idle = self.idle
        i = len(idle)
        while i:
            i -= 1
            conn = idle[i]
            if conn.closed:
                del idle[i]
                continue
            if now - conn.idle_since >= max_idle_time:
                del idle[i]
                conn.close()
                continue
            if conn.key != key:
                continue
            del idle[i]
            conn.reused = True
            return conn
        return None

    def put(self, conn: Idle, now: float, max_size: int) -> None:
        """Keep ``conn`` for reuse (its user has let go of it), or close it: closed already,
        or the pool is full. A full pool holding connections of other keys (other clients'
        PROXY headers) lets its oldest go instead: the newest is likelier to be asked for."""
        if conn.closed or max_size <= 0:
            conn.close()
            return
        idle = self.idle
        if len(idle) >= max_size:
            if not conn.key or all(c.key == conn.key for c in idle):
                conn.close()
                return
            idle.pop(0).close()
        conn.idle_since = now
        idle.append(conn)

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
