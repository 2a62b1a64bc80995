"""Session persistence: cookies, Engine.IO session ids and the tables that pin them to servers.

Pure functions and in-memory tables only: no sockets, no clock (``now`` is always passed in),
so the data path calls them from Protocol callbacks and tests run them directly.

Cookies (``sticky_session.type``)
    insert  ``server_token(server_id)`` is the cookie value the proxy sets
            (``set_cookie_header``) and reads back (``find_cookie``); the value is an opaque
            keyed hash of the server id, stable across processes and restarts, that does not
            reveal the server's address.
    server  the backend's own cookie: ``response_set_cookie`` finds the value a backend sets,
            a ``CookieMap`` remembers value -> server, ``find_cookie`` reads it back.

Socket.IO (``sticky_session.socketio``)
    ``is_socketio(target, path)`` tells Engine.IO requests apart; ``sid_from_handshake`` reads
    the session id from the open packet of a handshake response (Engine.IO v3 and v4,
    long-polling); ``sid_from_query`` reads ``sid=`` from every later request; a ``SidTable``
    maps sid -> server.

One request (``Affinity``)
    the routing decisions the data path asks for, per request: the server a request's session
    is pinned to (sid pin, insert token, backend cookie), whether an unknown sid starts a
    hunt (servers tried in turn until one does not answer 400), what the response must teach
    the tables or set in a cookie, and reading a handshake body for its sid as it passes.

Tables (``PinTable``, and its names ``SidTable`` and ``CookieMap``)
    key -> server id with an idle expiry: every successful ``lookup`` pushes the expiry to
    ``now + ttl``. Entries are kept in least-recently-used order, so ``expire`` (bounded work
    per call) and eviction at ``max_size`` both take from the oldest end.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final, TypeVar
from urllib.parse import unquote

from ..wire.http1 import target_path

if TYPE_CHECKING:
    from ..config.groups import StickySession

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "HANDSHAKE_PROBE_LIMIT",
    "Affinity",
    "CookieMap",
    "PinTable",
    "SidTable",
    "find_cookie",
    "is_socketio",
    "response_set_cookie",
    "server_token",
    "set_cookie_header",
    "sid_from_handshake",
    "sid_from_query",
    "token_map",
]

DEFAULT_MAX_ENTRIES: Final = 100_000
MAX_KEY_LENGTH: Final = 256  # a longer sid or cookie value is not a session id we pin
MAX_HANDSHAKE: Final = 65536  # bytes of a handshake body looked at; an open packet is ~100 bytes
# bytes of a passing handshake body kept for its sid (~100 needed)
HANDSHAKE_PROBE_LIMIT: Final = 4096

_TOKEN_KEY: Final = b"lbproxy-sticky"
_COOKIE_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 6265 cookie-octet: printable US-ASCII except space, DQUOTE, comma, semicolon, backslash.
_COOKIE_VALUE = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")


def server_token(server_id: str, secret: str = "") -> str:
    """An opaque 16-hex-digit token for ``server_id`` (``group/host:port``): a keyed BLAKE2b,
    the same in every process and after restarts, from which the address cannot be read.

    ``secret`` (``sticky_session.secret``) is the key; without it a built-in key is used, so
    anyone who knows an address and this source can compute its token. Instances sharing a
    secret understand each other's cookies."""
    key = hashlib.sha256(secret.encode("utf-8")).digest() if secret else _TOKEN_KEY
    digest = hashlib.blake2b(server_id.encode("utf-8"), key=key, digest_size=8)
    return digest.hexdigest()


def token_map(server_ids: Iterable[str], secret: str = "") -> dict[str, str]:
    """``server_token(id) -> id`` for the servers of a group: built once per snapshot, so a
    cookie value is resolved with one dict lookup (a token of a removed server is absent)."""
    return {server_token(sid, secret): sid for sid in server_ids}


def _unquote_value(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1]
    return value


def find_cookie(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    """The value of cookie ``name`` in the request's ``Cookie`` headers (every one of them,
    ``;``-separated pairs, optional whitespace, a double-quoted value unquoted); the first
    occurrence wins; None when absent. Names are case-sensitive, as in browsers."""
    for key, raw in headers:
        if len(key) != 6 or key.lower() != b"cookie":
            continue
        for pair in raw.decode("latin-1").split(";"):
            pname, sep, value = pair.partition("=")
            if sep and pname.strip() == name:
                return _unquote_value(value)
    return None


def set_cookie_header(name: str, value: str, max_age: float, path: str = "/") -> bytes:
    """The value of a ``Set-Cookie`` header: ``name=value; Max-Age=N; Path=/; HttpOnly;
    SameSite=Lax``. ``max_age`` is rounded up to whole seconds (0 or less: ``Max-Age=0``,
    which deletes the cookie). Raises ValueError for a name, value or path that cannot be
    written safely into a header."""
    if not _COOKIE_NAME.fullmatch(name):
        raise ValueError(f"not a cookie name: {name!r}")
    if not _COOKIE_VALUE.fullmatch(value):
        raise ValueError(f"not a cookie value: {value!r}")
    if not path.startswith("/") or any(c <= " " or c in ";\x7f" for c in path):
        raise ValueError(f"not a cookie path: {path!r}")
    seconds = max(0, math.ceil(max_age)) if math.isfinite(max_age) else 0
    text = f"{name}={value}; Max-Age={seconds}; Path={path}; HttpOnly; SameSite=Lax"
    return text.encode("ascii")


def response_set_cookie(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    """The value a response sets for cookie ``name`` in its ``Set-Cookie`` headers, the last one
    when set twice (as a browser keeps it); None when not set, or when the response clears it
    (an empty value, or ``Max-Age`` of 0 or less)."""
    found: str | None = None
    for key, raw in headers:
        if len(key) != 10 or key.lower() != b"set-cookie":
            continue
        pair, _, attributes = raw.decode("latin-1").partition(";")
        cname, sep, value = pair.partition("=")
        if not sep or cname.strip() != name:
            continue
        value = _unquote_value(value)
        if not value or _clears(attributes):
            found = None
            continue
        found = value
    return found


def _clears(attributes: str) -> bool:
    for attribute in attributes.split(";"):
        aname, _, avalue = attribute.partition("=")
        if aname.strip().lower() == "max-age":
            text = avalue.strip()
            try:
                return int(text) <= 0
            except ValueError:
                return False  # RFC 6265 5.2.2: an invalid Max-Age is ignored
    return False


# --- Socket.IO / Engine.IO ---------------------------------------------------------------


def sid_from_query(target: bytes) -> str | None:
    """The ``sid`` query parameter of a request target (percent-decoded), or None when absent,
    empty or longer than ``MAX_KEY_LENGTH``."""
    q = target.find(b"?")
    if q < 0:
        return None
    query = target[q + 1 :]
    h = query.find(b"#")
    if h >= 0:
        query = query[:h]
    for param in query.split(b"&"):
        if param.startswith(b"sid="):
            value = param[4:]
            if not value or len(value) > 3 * MAX_KEY_LENGTH:
                return None
            sid = value.decode("latin-1")
            if "%" in sid:
                sid = unquote(sid, encoding="latin-1")
            return sid if 0 < len(sid) <= MAX_KEY_LENGTH else None
    return None


def is_socketio(target: bytes, path: str) -> bool:
    """Whether the request target is under the Socket.IO path: ``/socket.io/`` (configured with
    or without the trailing slash) matches ``/socket.io``, ``/socket.io/`` and
    ``/socket.io/?EIO=4...``, not ``/socket.iox``."""
    base = path.rstrip("/")
    if not base:
        return True
    p = target_path(target)
    return p == base or p.startswith(base + "/")


_V3_BINARY_TYPES = (0, 1)


def sid_from_handshake(body: bytes) -> str | None:
    """The ``sid`` of the Engine.IO open packet at the start of a handshake response body.

    Understood: v4 (``0{"sid":...}``, possibly followed by ``\\x1e`` and more packets), v3
    text payloads (``96:0{"sid":...}2:40``), v3 binary payloads (``\\x00`` length digits
    ``\\xff`` then the packet). Anything else (garbage, an error body, a JSONP payload, a
    compressed body) gives None.
    """
    body = body[:MAX_HANDSHAKE]
    packet: str
    try:
        if body[:1] == b"0":
            text = body.decode("utf-8")
            end = text.find("\x1e")
            packet = text if end < 0 else text[:end]
        elif body[:1].isdigit():
            colon = body.find(b":", 0, 12)
            if colon < 0 or not body[:colon].isdigit():
                return None
            length = int(body[:colon])
            text = body[colon + 1 :].decode("utf-8")
            packet = text[:length]  # v3 counts characters
        elif body[:1] and body[0] in _V3_BINARY_TYPES:
            stop = body.find(b"\xff", 1, 12)
            digits = body[1:stop] if stop > 0 else b""
            if body[0] != 0 or not digits or any(d > 9 for d in digits):
                return None
            length = int("".join(str(d) for d in digits))
            # Binary packets may follow: decode leniently, the slice stops before them.
            packet = body[stop + 1 :].decode("utf-8", "replace")[:length]
        else:
            return None
    except (UnicodeDecodeError, ValueError):
        return None
    if not packet.startswith("0{"):
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(packet, 1)
    except (ValueError, RecursionError):
        return None
    sid = data.get("sid") if isinstance(data, dict) else None
    if not isinstance(sid, str) or not 0 < len(sid) <= MAX_KEY_LENGTH:
        return None
    return sid


# --- tables --------------------------------------------------------------------------------


class _Pin:
    __slots__ = ("expires_at", "server_id", "ttl")

    def __init__(self, server_id: str, ttl: float, expires_at: float) -> None:
        self.server_id = server_id
        self.ttl = ttl
        self.expires_at = expires_at


class PinTable:
    """key -> server id, forgotten after ``ttl`` seconds without use, at most ``max_size``
    entries (the least recently used is evicted first).

    ``lookup`` never returns an expired entry. ``expire`` reclaims memory from the least
    recently used end and stops at the first live entry, so with one ttl per table (the
    normal case) it removes exactly the expired entries; with mixed ttls a stale entry further
    in waits for its lookup or for eviction.
    """

    __slots__ = ("_entries", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self.max_size = max_size
        self._entries: OrderedDict[str, _Pin] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def learn(self, key: str, server_id: str, now: float, ttl: float) -> None:
        """Pin ``key`` to ``server_id`` (replacing any previous pin) until ``now + ttl``.

        A new key also drops up to two expired entries, so a table that only ever learns
        shrinks back as sessions go idle even if ``expire`` is never called."""
        entries = self._entries
        pin = entries.get(key)
        if pin is None:
            self.expire(now, 2)
            entries[key] = _Pin(server_id, ttl, now + ttl)
            if len(entries) > self.max_size:
                entries.popitem(last=False)
        else:
            pin.server_id = server_id
            pin.ttl = ttl
            pin.expires_at = now + ttl
            entries.move_to_end(key)

    def lookup(self, key: str, now: float) -> str | None:
        """The server ``key`` is pinned to, refreshing its expiry; None when unknown or
        expired (an expired entry is dropped)."""
        pin = self._entries.get(key)
        if pin is None:
            return None
        if pin.expires_at <= now:
            del self._entries[key]
            return None
        pin.expires_at = now + pin.ttl
        self._entries.move_to_end(key)
        return pin.server_id

    def forget(self, key: str) -> None:
        """Drop ``key`` (the session ended); unknown keys are ignored."""
        self._entries.pop(key, None)

    def forget_server(self, server_id: str) -> int:
        """Drop every pin to ``server_id`` (O(n): for a removed server, not per request)."""
        stale = [k for k, pin in self._entries.items() if pin.server_id == server_id]
        for k in stale:
            del self._entries[k]
        return len(stale)

    def expire(self, now: float, limit: int = 1000) -> int:
        """Drop up to ``limit`` expired entries from the least recently used end; the number
        dropped. Call it periodically; when it returns ``limit``, more may be waiting."""
        entries = self._entries
        removed = 0
        while removed < limit and entries:
            key, pin = next(iter(entries.items()))
            if pin.expires_at > now:
                break
            del entries[key]
            removed += 1
        return removed


class SidTable(PinTable):
    """Engine.IO session id -> the server that issued it (``sticky_session.socketio``)."""

    __slots__ = ()


class CookieMap(PinTable):
    """A backend's cookie value -> the server that set it (``sticky_session.type: server``)."""

    __slots__ = ()


# --- one request ---------------------------------------------------------------------------

_S = TypeVar("_S")


class Affinity:
    """One request's session affinity under its group's ``sticky_session``.

    Made from the request's target and headers; holds the group's ``sids`` and ``cookies``
    tables. The caller resolves server ids to its own server objects (``by_id``, ``by_token``)
    and checks that the server may still take the session; ``now`` is passed to every call.
    """

    __slots__ = ("config", "cookies", "hunt", "probe", "sid", "sids", "sio", "token")

    def __init__(
        self,
        config: StickySession,
        sids: PinTable,
        cookies: PinTable,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.config = config
        self.sids = sids
        self.cookies = cookies
        self.sio = config.socketio and is_socketio(target, config.socketio_path)
        self.sid = sid_from_query(target) if self.sio else None  # the session id it carries
        # The insert cookie the client sent (compared with the server that answers).
        self.token = find_cookie(headers, config.cookie) if config.type == "insert" else None
        # The sid has no pin in this process (learnt by another worker, or before a restart):
        # servers are tried in turn until one does not answer 400.
        self.hunt = False
        self.probe: bytearray | None = None  # a handshake body being read for its sid

    def pinned(
        self,
        headers: list[tuple[bytes, bytes]],
        by_id: Mapping[str, _S],
        by_token: Mapping[str, _S],
        now: float,
    ) -> _S | None:
        """The server the session is pinned to: the sid's pin first, then the insert token or
        the backend cookie's pin; None when unpinned or pinned to a server no longer known.
        An unknown sid starts a hunt (``hunt``)."""
        server: _S | None = None
        sid = self.sid
        if sid is not None:
            sid_server = self.sids.lookup(sid, now)
            if sid_server is not None:
                server = by_id.get(sid_server)
            else:
                self.hunt = True
        if server is None and self.token is not None:
            server = by_token.get(self.token)
        elif server is None and self.config.type == "server":
            value = find_cookie(headers, self.config.cookie)
            if value is not None:
                pinned_id = self.cookies.lookup(value, now)
                if pinned_id is not None:
                    server = by_id.get(pinned_id)
        return server

    def movable(self, upgrade: bool) -> bool:
        """Whether the pin may give way while a rebalance relieves the pinned
        server: only the proxy's own insert cookie (re-pinned on the answer) of a WebSocket
        upgrade or of a Socket.IO handshake (a new session); never a live sid's pin nor the
        backend's own cookie, which name state held on that server."""
        if self.token is None or self.config.type != "insert" or self.sid is not None:
            return False  # no insert cookie, or an Engine.IO session living on that server
        return upgrade or self.sio

    def hunt_answer(self, status: int, server_id: str, now: float, ttl: float) -> bool:
        """During a hunt: True when the server answered 400 ("not my session": try the next
        one); any other answer comes from the server holding the session, which is pinned
        (``ttl``: the pin's idle expiry) and the hunt ends."""
        if status == 400:
            return True
        assert self.sid is not None
        self.sids.learn(self.sid, server_id, now, ttl)
        self.hunt = False
        return False

    def response(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        server_id: str,
        server_token: str,
        now: float,
    ) -> tuple[bytes, ...]:
        """Learn or set what pins the session to the server that answered; the extra
        response header lines (an insert cookie for a new or re-pinned client)."""
        cfg = self.config
        extra: tuple[bytes, ...] = ()
        if cfg.type == "insert" and self.token != server_token:
            # New client, or its pinned server is gone or down: (re)pin it to this one.
            cookie = set_cookie_header(cfg.cookie, server_token, cfg.cookie_timeout)
            extra = (b"Set-Cookie: " + cookie,)
        elif cfg.type == "server":
            value = response_set_cookie(headers, cfg.cookie)
            if value is not None:
                self.cookies.learn(value, server_id, now, cfg.cookie_timeout)
        if self.sio:
            if self.sid is None and status == 200:
                self.probe = bytearray()  # an Engine.IO handshake: its body names the sid
            elif self.sid is not None and status == 400:
                self.sids.forget(self.sid)  # "Session ID unknown": the session is over
        return extra

    def read_handshake(
        self, data: bytes, chunked: bool, server_id: str, now: float, ttl: float
    ) -> None:
        """Read a handshake body as it passes (``probe`` set by ``response``) and pin its sid
        to the server; gives up after ``HANDSHAKE_PROBE_LIMIT`` bytes."""
        probe = self.probe
        assert probe is not None
        probe += data[: HANDSHAKE_PROBE_LIMIT - len(probe)]
        body = bytes(probe)
        if chunked:
            body = body.partition(b"\r\n")[2]  # the handshake fits the first chunk
        sid = sid_from_handshake(body)
        if sid is not None:
            self.sids.learn(sid, server_id, now, ttl)
            self.probe = None
        elif len(probe) >= HANDSHAKE_PROBE_LIMIT:
            self.probe = None

    def tunnel_closed(self, _tunnel: object) -> None:
        """An upgraded Engine.IO session ends with its tunnel: its sid pin goes with it."""
        if self.sid is not None:
            self.sids.forget(self.sid)
