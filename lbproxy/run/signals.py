"""The process's SIGHUP, SIGTERM and SIGINT, from its first statement to its exit.

Owns ``Signals``, one per process (``take``): the entry point (``cli.main``, a worker's
``__main__``) takes the three signals before it imports anything heavy, reads its config or
binds a socket, so none of them ever gets its default action (SIGHUP and SIGTERM would kill
the process, SIGINT would raise KeyboardInterrupt wherever it lands). Until the event loop
runs, a signal is only recorded; ``attach`` (the loop's first step) acts on what was
recorded, and every later signal is acted on in the loop.

- SIGHUP reloads, but not before the proxy is ready: one that arrives while it starts is
  held, and performed by ``ready`` (several coalesce into one reload). In a worker SIGHUP is
  ignored: reloads come through the supervisor.
- The first SIGTERM/SIGINT sets ``stop``: before ready, ``until_stopped`` abandons the start
  and the caller closes what was started; once ready, the graceful shutdown. A second one
  calls ``now`` (exit at once).

One Python-level handler per signal for the whole life of the process, never handed over to
``loop.add_signal_handler``: a hand-over would let a signal that arrives during it be acted on
twice (recorded by the first handler, then replayed by the loop from its wakeup fd). The
handler runs promptly while the loop waits: uvloop wakes on every signal (its wakeup fd) and
runs the Python handlers; this one only records and schedules ``_dispatch`` in the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("lbproxy")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CAUGHT = (signal.SIGHUP, *STOP_SIGNALS)


def exit_now() -> None:
    os._exit(0)


class Signals:
    def __init__(self, hup: bool) -> None:
        # False: a worker's. SIGHUP is ignored, and the stop signals are not logged (the
        # supervisor, which sends them, logs the stop for all).
        self.hup = hup
        self.stopping = "shutting down gracefully"  # what the first stop signal logs, once ready
        self.now: Callable[[], None] = exit_now  # the second stop signal
        self._arrived: deque[int] = deque()  # recorded, not yet acted on
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stops = 0
        self._ready = False
        self._held = False  # a SIGHUP arrived before ready
        self._reload: Callable[[], Coroutine[Any, Any, Any]] | None = None
        self._reloads: set[asyncio.Task[Any]] = set()  # a reference keeps each task alive

    def install(self) -> Signals:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal if self.hup else signal.SIG_IGN)
        # A worker starts with these blocked (child.spawn), so that none can end it while its
        # interpreter starts: one that came meanwhile is pending, and is handled now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CAUGHT)
        return self

    # ------------------------------------------------------------------ in the loop
    @property
    def stop(self) -> asyncio.Event:
        """Set by the first SIGTERM/SIGINT (``attach`` must have run)."""
        assert self._stop is not None, "Signals.attach() first"
        return self._stop

    def attach(self) -> None:
        """Act on signals in the running loop from now on, starting with those recorded."""
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._dispatch()

    def detach(self) -> None:
        """The loop is ending: record what arrives from here (the process is exiting)."""
        self._loop = None

    def ready(self, reload: Callable[[], Coroutine[Any, Any, Any]] | None) -> None:
        """The proxy serves: a SIGHUP calls ``reload`` from now on (None: SIGHUP is ignored),
        and one held is done now."""
        self._ready = True
        self._reload = reload
        if self._held and reload is not None and not self.stop.is_set():
            self._held = False
            log.info("SIGHUP received while starting: reloading now")
            self._start_reload()

    async def until_stopped(self, aw: Awaitable[Any]) -> bool:
        """Run ``aw`` unless a stop signal comes first: True when it finished (its exception
        propagates), False when a stop signal cancelled it; the caller then closes whatever
        it had started."""
        import asyncio

        task = asyncio.ensure_future(aw)
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # whatever it was doing, abandoned
        return False

    # ------------------------------------------------------------------ handlers
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Python runs this in the main thread between two bytecodes of whatever runs: record
        # and leave the acting to the loop, where nothing is half done.
        self._arrived.append(signum)
        loop = self._loop
        if loop is not None:
            # RuntimeError: the loop has just closed (the process is exiting).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._dispatch)

    def _dispatch(self) -> None:
        if self._loop is None:
            return
        while self._arrived:
            signum = self._arrived.popleft()
            if signum == signal.SIGHUP:
                self._on_hup()
            else:
                self._on_stop(signal.Signals(signum).name)

    def _on_stop(self, name: str) -> None:
        self._stops += 1
        first = self._stops == 1
        if self.hup:  # not a worker (the supervisor logs the stop for all)
            if not first:
                log.warning("%s again: stopping now", name)
            elif not self._ready:
                log.info("%s while starting: stopping (send it again to stop at once)", name)
            else:
                log.info("%s: %s (send it again to stop at once)", name, self.stopping)
        if first:
            self.stop.set()
        else:
            self.now()

    def _on_hup(self) -> None:
        if not self._ready:
            log.info("SIGHUP while starting: held, the reload waits until lbproxy is ready")
            self._held = True  # more SIGHUPs before ready: still one reload
            return
        if self._reload is not None:
            self._start_reload()

    def _start_reload(self) -> None:
        assert self._loop is not None and self._reload is not None
        task = self._loop.create_task(self._reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)


_taken: Signals | None = None


def take(hup: bool = True) -> Signals:
    """The process's ``Signals``, installed by the first call (the entry point's first
    statement); later calls return the same one."""
    global _taken
    if _taken is None:
        _taken = Signals(hup).install()
    return _taken
