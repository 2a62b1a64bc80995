"""A worker process started with lbproxy's signals blocked, and its pipes in the event loop.

Owns ``Child``: one process started by ``spawn`` with ``os.posix_spawn``, its stdin (a write
transport) and stdout (a stream reader) attached to the running loop, and its exit seen
through a pidfd. It offers what the supervisor used of ``asyncio.subprocess.Process``:
``pid``, ``stdin``, ``stdout``, ``returncode``, ``wait`` and ``send_signal``.

Why not ``asyncio.create_subprocess_exec``: under uvloop it spawns through libuv, which
empties the signal mask in the child before ``exec``. The new interpreter then spends its
first ~20 ms (before any lbproxy code runs and ``signals.take`` installs the handlers) with
SIGHUP and SIGTERM at their default action, which ends the process: a ``kill -HUP`` aimed at
the worker processes at that moment killed a worker. ``posix_spawn`` with ``setsigmask``
starts the child with SIGHUP, SIGTERM and SIGINT *blocked*: a signal that arrives while the
interpreter starts stays pending, and ``Signals.install`` unblocks them once its handlers
are in place, so it is handled like any later one (held, ignored or a graceful stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence

from .signals import CAUGHT

# Signals a spawned process starts with at their default action (as subprocess does with
# restore_signals: Python ignores SIGPIPE and SIGXFSZ itself, a child should not inherit that).
_DEFAULT_IN_CHILD = (signal.SIGPIPE, signal.SIGXFSZ)


class Child:
    """A spawned process: pipes and exit in the running loop."""

    def __init__(
        self, pid: int, stdin: asyncio.WriteTransport, stdout: asyncio.StreamReader
    ) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pidfd = os.pidfd_open(pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        """The pidfd is readable: the process has exited; collect its status once."""
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: the code is unknown
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        # As asyncio reports it: the exit code, or minus the signal that ended the process.
        self.returncode = os.waitstatus_to_exitcode(status)
        self.stdin.close()
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited; the pidfd reports it
                os.kill(self.pid, sig)


async def spawn(
    argv: Sequence[str], env: Mapping[str, str], limit: int, new_session: bool = True
) -> Child:
    """Start ``argv`` with lbproxy's signals blocked, stdin and stdout as pipes (stderr
    shared), in its own session when ``new_session``; ``limit`` bounds a stdout line."""
    loop = asyncio.get_running_loop()
    # os.pipe() descriptors are close-on-exec: the child keeps only what is dup2'ed onto 0/1.
    in_read, in_write = os.pipe()
    out_read, out_write = os.pipe()
    try:
        pid = os.posix_spawn(
            argv[0],
            list(argv),
            dict(env),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, in_read, 0),
                (os.POSIX_SPAWN_DUP2, out_write, 1),
            ],
            setsid=new_session,
            setsigmask=CAUGHT,
            setsigdef=_DEFAULT_IN_CHILD,
        )
    finally:
        os.close(in_read)
        os.close(out_write)
    stdout = asyncio.StreamReader(limit=limit, loop=loop)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(stdout, loop=loop), os.fdopen(out_read, "rb", 0)
    )
    stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(in_write, "wb", 0))
    return Child(pid, stdin, stdout)
