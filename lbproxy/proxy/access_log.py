"""The access log: one line per HTTP request, one per WebSocket tunnel when it closes.

Owns formatting (text or JSON) and writing. Lines are handed to a queue and written by a
single background thread, so a slow disk or a blocked stderr never stalls the event loop;
``close`` flushes what is queued.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ..config.model import ACCESS_LOG_DRAIN_TIMEOUT

if TYPE_CHECKING:
    from ..config.top import AccessLog as AccessLogConfig

_log = logging.getLogger("lbproxy")


class AccessLog:
    """One per process; ``configure`` swaps its destination in place on reload, so tunnels
    opened before the reload still log their close."""

    def __init__(self, config: AccessLogConfig) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._logger = logging.getLogger(f"lbproxy.access.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._handler = logging.handlers.QueueHandler(self._queue)
        self._logger.addHandler(self._handler)
        self._listener: logging.handlers.QueueListener | None = None
        self._target: logging.Handler | None = None
        self._retiring: list[threading.Thread] = []  # writers of replaced destinations
        self.config = config
        self.enabled = config.enabled
        self.json = config.format == "json"

    def start(self) -> None:
        self._open(self.config)

    def _open(self, config: AccessLogConfig) -> None:
        target: logging.Handler
        if config.path:
            target = logging.FileHandler(config.path, encoding="utf-8")
        else:
            target = logging.StreamHandler(sys.stderr)
        target.setFormatter(logging.Formatter("%(message)s"))
        self._target = target
        self._listener = logging.handlers.QueueListener(self._queue, target)
        self._listener.start()

    def problem(self, config: AccessLogConfig) -> str | None:
        """Why ``config`` could not be applied (its file cannot be opened), or None."""
        if not config.enabled or not config.path or config.path == self.config.path:
            return None
        try:
            with open(config.path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            return f"access_log.path: cannot open {config.path}: {exc.strerror or exc}"
        return None

    def configure(self, config: AccessLogConfig) -> None:
        """Apply a reloaded access_log section. The new destination is opened first (if it
        cannot be, the old one stays and the error is logged); lines from here on go to a new
        queue, and the old writer finishes its own queue on a thread of its own, so a
        destination that stopped draining never holds up the event loop."""
        if config == self.config:
            return
        old = (self._handler, self._listener, self._target)
        new_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        queue_, self._queue = self._queue, new_queue
        try:
            self._open(config)
        except OSError as exc:
            self._queue = queue_
            _log.error(
                "access_log.path: cannot open %s: %s; still logging to the previous destination",
                config.path,
                exc.strerror or exc,
            )
            return
        self._handler = logging.handlers.QueueHandler(new_queue)
        self._logger.addHandler(self._handler)
        self._logger.removeHandler(old[0])
        self.config = config
        self.enabled = config.enabled
        self.json = config.format == "json"
        t = threading.Thread(target=_retire, args=old[1:], name="access-log-retire", daemon=True)
        t.start()
        self._retiring = [x for x in self._retiring if x.is_alive()] + [t]

    def close(self) -> None:
        """Write out what is queued, waiting at most ACCESS_LOG_DRAIN_TIMEOUT in all: a
        destination that stopped draining (a FIFO nobody reads) must not hold up shutdown."""
        deadline = time.monotonic() + ACCESS_LOG_DRAIN_TIMEOUT
        for t in self._retiring:
            t.join(max(0.0, deadline - time.monotonic()))  # lines queued before a reload
        self._retiring = []
        listener = self._listener
        self._listener = None
        if listener is not None:
            listener.enqueue_sentinel()
            thread = listener._thread
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    _log.warning(
                        "access log: its destination took no lines for %gs; some are lost",
                        ACCESS_LOG_DRAIN_TIMEOUT,
                    )
                    return  # the writer is stuck in a write: leave the target to it
            listener._thread = None
        if self._target is not None:
            self._target.close()
            self._target = None

    def _emit(self, fields: dict[str, Any]) -> None:
        if self.json:
            line = json.dumps(fields, separators=(",", ":"))
        else:
            line = " ".join(_text(k, v) for k, v in fields.items())
        self._logger.info(line)

    def request(
        self,
        *,
        client: str,
        listener: str,
        method: str,
        path: str,
        status: int,
        server: str,
        upstream_time: float | None,
        total_time: float,
        bytes_in: int,
        bytes_out: int,
        protocol: str = "HTTP/1.1",
    ) -> None:
        self._emit(
            {
                "time": _now(),
                "type": "http",
                "client": client,
                "listener": listener,
                "method": method,
                "path": path,
                "protocol": protocol,
                "status": status,
                "server": server or "-",
                "upstream_time": None if upstream_time is None else round(upstream_time, 6),
                "total_time": round(total_time, 6),
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
            }
        )

    def tunnel(
        self,
        *,
        client: str,
        listener: str,
        method: str,
        path: str,
        server: str,
        duration: float,
        bytes_in: int,
        bytes_out: int,
        reason: str,
        messages_in: int = 0,
        messages_out: int = 0,
        close_code: str = "-",
        protocol: str = "HTTP/1.1",
    ) -> None:
        self._emit(
            {
                "time": _now(),
                "type": "websocket",
                "client": client,
                "listener": listener,
                "method": method,
                "path": path,
                "protocol": protocol,
                # What the client was answered: 101, or 200 to an HTTP/2 extended CONNECT.
                "status": 200 if protocol == "HTTP/2" else 101,
                "server": server,
                "duration": round(duration, 6),
                "total_time": round(duration, 6),
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "close_reason": reason,
                # Data messages each way, and the code of the first close frame ("-": none
                # passed, "none": a close frame without a code); byte tunnels log 0 and "-".
                "messages_in": messages_in,
                "messages_out": messages_out,
                "close_code": close_code,
            }
        )


def _retire(
    listener: logging.handlers.QueueListener | None, target: logging.Handler | None
) -> None:
    """Write out what is queued for a replaced destination, then close it (off the loop)."""
    if listener is not None:
        listener.stop()
    if target is not None:
        target.close()


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _text(key: str, value: Any) -> str:
    if value is None:
        value = "-"
    text = str(value)
    if not text or any(c in text for c in ' "\\') or not text.isprintable():
        text = json.dumps(text)
    return f"{key}={text}"
