"""The counters behind every metric lbproxy exposes, and moving them between processes.

The data path never calls prometheus-client: it adds plain integers to slotted objects held
by long-lived state (one ``ListenerStats`` per listener name, one ``ServerStats`` per server
id), resolved once per connection. ``metric_families`` turns them into Prometheus families
only when /metrics is scraped, adding the bytes of connections still open. This keeps
per-chunk work to an integer addition and makes summing over worker processes a matter of
adding numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

# Buckets for request and upstream times (seconds): sub-millisecond to a minute.
TIME_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Buckets for WebSocket lifetimes: a second to a day.
WS_BUCKETS = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
# Status codes as the "code" label, made once: str(code) was a string made per request.
_CODES = [str(code) for code in range(1000)]

# drain: the proxy closed it (close frames both ways) because its server was draining;
# policy: because the client broke the listener's WebSocket message policy.
WS_CLOSE_REASONS = (
    "client",
    "server",
    "idle_timeout",
    "shutdown",
    "drain",
    "rebalance",
    "policy",
    "error",
)
# Which part of listeners[].websocket a client broke; extension: a frame with RSV bits set (a
# compressed one) under max_message_size, where no extension is negotiated.
WS_POLICY_REASONS = ("max_message_size", "messages_per_second", "extension")
# Who sent a WebSocket close frame: a side of the tunnel, or the proxy itself.
WS_CLOSE_SIDES = ("client", "server", "proxy")
# How a server's tunnels ended, by the code of their first close frame: normal, going away,
# abnormal (no close frame at all: the connection just ended), anything else (a close frame
# without a code, 1005, is one of these).
WS_CLOSE_CLASSES = ("1000", "1001", "1006", "other")
# lbproxy_backend_state's states: health, with draining over it.
BACKEND_STATES = ("up", "down", "unknown", "draining")
# protocol: a response the proxy cannot pass on (garbage, a head too large, bad framing).
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "protocol")
# Why a listener closed a connection at once, before reading from it (proxy_protocol: from
# a source not in proxy_protocol.from, or without a valid PROXY header in time).
REFUSE_REASONS = ("max_connections", "acl", "connections_per_client", "proxy_protocol")
# Why a TLS handshake to a backend failed: verify (its certificate does not verify against
# tls.ca or does not name tls.server_name), certificate (it refused the proxy's client
# certificate with an alert that says so), protocol (no version or cipher both accept), reset
# (it closed the connection mid-handshake: what a server refusing the proxy's certificate
# under TLS 1.2 looks like through uvloop), other.
BACKEND_TLS_FAILURE_REASONS = ("verify", "certificate", "protocol", "reset", "other")
# Why a TLS handshake failed: client_certificate (none under client_auth: required, or one
# that does not verify), protocol (no version or cipher both accept: the policy refused it),
# timeout (not done within client_header_timeout), other (the client went away, spoke
# plain HTTP, refused the proxy's certificate, ...). The same names as tls.FAILURE_REASONS.
TLS_FAILURE_REASONS = ("client_certificate", "protocol", "timeout", "other")


class Histogram:
    """Cumulative-on-export histogram: observe finds the bucket and adds twice."""

    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # The first bucket at or above ``value`` (as bisect_left finds it), walked from the
        # smallest: a request's duration is nearly always in the first few, and the walk is
        # native arithmetic under mypyc where bisect_left was a Python call on a boxed float.
        buckets = self.buckets
        i = 0
        n = len(buckets)
        while i < n and buckets[i] < value:
            i += 1
        self.counts[i] += 1
        self.sum += value

    def add(self, other: Histogram) -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.sum += other.sum

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, c in zip(self.buckets, self.counts, strict=False):
            total += c
            out.append((_fmt(bound), total))
        total += self.counts[-1]
        out.append(("+Inf", total))
        return out


def _fmt(v: float) -> str:
    return repr(float(v))


class LiveConnection(Protocol):
    """What the collector reads from a connection that is still open."""

    def live_bytes(self) -> tuple[int, int]: ...

    def live_messages(self) -> tuple[str, int, int]:
        """A tunnel's server id and its WebSocket messages so far, both ways; ("", 0, 0) for
        a connection that is not a tunnel."""
        ...


def close_class(side: str | None, code: int | None) -> str:
    """A tunnel's end as one of WS_CLOSE_CLASSES, from its first close frame's sender
    (``side``, None: no close frame was seen) and code (None: a close frame without one)."""
    if side is None:
        return "1006"
    if code is not None and code in (1000, 1001, 1006):
        return str(code)
    return "other"


class ListenerStats:
    """Counters of one listener name; outlives config snapshots."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "cluster_fallbacks",
        "connections_active",
        "connections_refused",
        "connections_total",
        "h2_rapid_resets",
        "live",
        "name",
        "protocols",
        "request_duration",
        "requests",
        "tls_failures",
        "ws_close_codes",
        "ws_closes",
        "ws_duration",
        "ws_messages_in",
        "ws_messages_out",
        "ws_policy",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections_active = 0
        self.connections_total = 0
        self.connections_refused = dict.fromkeys(REFUSE_REASONS, 0)
        # scope cluster while Redis is unreachable: requests decided locally ("open") or
        # refused ("closed")
        self.cluster_fallbacks = {"open": 0, "closed": 0}
        self.tls_failures = dict.fromkeys(TLS_FAILURE_REASONS, 0)
        self.bytes_in = 0  # closed connections' bytes; open ones are read from `live`
        self.bytes_out = 0
        # (server_group, server, code) -> count
        self.requests: dict[tuple[str, str, str], int] = {}
        self.protocols: dict[str, int] = {}  # "HTTP/1.1", "HTTP/2", ... -> requests
        self.h2_rapid_resets = 0  # HTTP/2 connections closed for resetting streams too fast
        self.request_duration: dict[str, Histogram] = {}  # server_group -> histogram
        self.ws_duration: dict[str, Histogram] = {}
        self.ws_closes = dict.fromkeys(WS_CLOSE_REASONS, 0)
        self.ws_messages_in = 0  # WebSocket data messages, client to server
        self.ws_messages_out = 0  # and server to client
        self.ws_close_codes: dict[tuple[str, str], int] = {}  # (side, code) -> close frames
        self.ws_policy = dict.fromkeys(WS_POLICY_REASONS, 0)  # tunnels closed by the policy
        self.live: set[LiveConnection] = set()

    def count_request(
        self, group: str, server: str, code: int, duration: float, protocol: str = "HTTP/1.1"
    ) -> None:
        key = (group, server, _CODES[code] if 0 <= code < 1000 else str(code))
        self.requests[key] = self.requests.get(key, 0) + 1
        self.protocols[protocol] = self.protocols.get(protocol, 0) + 1
        h = self.request_duration.get(group)
        if h is None:
            h = self.request_duration[group] = Histogram(TIME_BUCKETS)
        h.observe(duration)

    def count_ws_policy(self, reason: str) -> None:
        self.ws_policy[reason] += 1

    def count_ws_close_code(self, side: str, code: int | None) -> None:
        key = (side, "none" if code is None else str(code))
        self.ws_close_codes[key] = self.ws_close_codes.get(key, 0) + 1

    def count_ws_close(self, group: str, reason: str, duration: float) -> None:
        self.ws_closes[reason] += 1
        h = self.ws_duration.get(group)
        if h is None:
            h = self.ws_duration[group] = Histogram(WS_BUCKETS)
        h.observe(duration)


class ServerStats:
    """Counters of one server (by stable id); outlives config snapshots."""

    __slots__ = (
        "errors",
        "group",
        "health_checks",
        "server",
        "tls_failures",
        "upstream_response",
        "ws_active",
        "ws_close_classes",
        "ws_drained",
        "ws_messages_in",
        "ws_messages_out",
        "ws_rebalanced",
        "ws_total",
    )

    def __init__(self, group: str, server: str) -> None:
        self.group = group
        self.server = server
        self.upstream_response = Histogram(TIME_BUCKETS)
        self.errors = dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
        self.health_checks = {"success": 0, "failure": 0}
        self.tls_failures = dict.fromkeys(BACKEND_TLS_FAILURE_REASONS, 0)  # handshakes to it
        self.ws_active: dict[str, int] = {}  # listener -> open tunnels
        self.ws_total: dict[str, int] = {}  # listener -> tunnels established
        self.ws_drained = 0  # tunnels the proxy closed because this server was draining
        # Ended tunnels' data messages (client to server, server to client) and ends by
        # close class, added once per tunnel as it ends: the data path counts messages per
        # listener only (one addition a chunk), the open tunnels' are read from them.
        self.ws_messages_in = 0
        self.ws_messages_out = 0
        self.ws_close_classes = dict.fromkeys(WS_CLOSE_CLASSES, 0)
        self.ws_rebalanced = 0  # tunnels the proxy moved off it (rebalance, shed)

    def ws_opened(self, listener: str) -> None:
        self.ws_active[listener] = self.ws_active.get(listener, 0) + 1
        self.ws_total[listener] = self.ws_total.get(listener, 0) + 1

    def ws_closed(self, listener: str, messages_in: int, messages_out: int, ended: str) -> None:
        """A tunnel to this server ended: its messages both ways and its close class."""
        self.ws_active[listener] -= 1
        self.ws_messages_in += messages_in
        self.ws_messages_out += messages_out
        self.ws_close_classes[ended] += 1

    @property
    def idle(self) -> bool:
        return not any(self.ws_active.values())


class ReloadStats:
    __slots__ = ("failure", "last_success", "last_timestamp", "success")

    def __init__(self) -> None:
        self.success = 0
        self.failure = 0
        self.last_success = 1
        self.last_timestamp = time.time()


class Registry:
    """All stats of one process. The data path holds references into it, never looks up."""

    def __init__(self) -> None:
        self.listeners: dict[str, ListenerStats] = {}
        self.servers: dict[str, ServerStats] = {}
        self.retries: dict[str, int] = {}  # server_group -> retries
        self.reloads = ReloadStats()
        # Filled in by the owner of health state: server id -> (group, server, up)
        self.backend_up: dict[str, tuple[str, str, int]] = {}
        # Likewise: server id -> (group, server, one of BACKEND_STATES)
        self.backend_state: dict[str, tuple[str, str, str]] = {}
        # server id -> (group, server, effective weight): slow start (``control.ramp``)
        self.backend_weight: dict[str, tuple[str, str, float]] = {}
        # DNS discovery (in the process that runs it): (server_group, result) -> lookups, and
        # the ids of the servers it found (for lbproxy_backend_discovered).
        self.dns_lookups: dict[tuple[str, str], int] = {}
        self.discovered: set[str] = set()
        # The config in force's certificates: (listener, certificate file) -> notAfter
        # (Unix seconds); the admin's under the listener name "admin.tls".
        self.certificates: dict[tuple[str, str], float] = {}
        # With ``cluster`` (in the process that runs the fleet link): (live instances, Redis
        # up 1 or 0); None without one (no samples).
        self.cluster: tuple[int, int] | None = None

    def listener(self, name: str) -> ListenerStats:
        s = self.listeners.get(name)
        if s is None:
            s = self.listeners[name] = ListenerStats(name)
        return s

    def server(self, server_id: str, group: str, server: str) -> ServerStats:
        s = self.servers.get(server_id)
        if s is None:
            s = self.servers[server_id] = ServerStats(group, server)
        return s

    def forget_server(self, server_id: str) -> None:
        """Drop a removed server's series (called once its last connection has ended)."""
        ss = self.servers.pop(server_id, None)
        self.backend_up.pop(server_id, None)
        self.backend_state.pop(server_id, None)
        self.backend_weight.pop(server_id, None)
        if ss is None:
            return
        for ls in self.listeners.values():
            for key in [k for k in ls.requests if k[0] == ss.group and k[1] == ss.server]:
                del ls.requests[key]

    def count_retry(self, group: str) -> None:
        self.retries[group] = self.retries.get(group, 0) + 1

    def live_messages(self) -> dict[str, list[int]]:
        """Server id -> [in, out]: the messages of this process's tunnels still open (the
        ended ones' are in ServerStats). A scan of the open connections, for a timer or a
        dump, never for the data path."""
        out: dict[str, list[int]] = {}
        for ls in self.listeners.values():
            for conn in list(ls.live):
                sid, m_in, m_out = conn.live_messages()
                if sid:
                    acc = out.setdefault(sid, [0, 0])
                    acc[0] += m_in
                    acc[1] += m_out
        return out


# ---------------------------------------------------------------------------------------------
# Moving stats between processes: a worker dumps its Registry as JSON-ready data and the
# supervisor loads and sums them. Generic over the slots, so a counter added above travels
# without touching this code. Open connections' bytes, and open tunnels' messages per server,
# are folded in at dump time.

_LOCAL = frozenset({"live", "name", "group", "server"})


def _encode(value: object) -> object:
    if isinstance(value, Histogram):
        return {"h": [list(value.buckets), value.counts, value.sum]}
    if isinstance(value, dict):
        return {
            "d": [[list(k) if isinstance(k, tuple) else k, _encode(v)] for k, v in value.items()]
        }
    return value


def _decode(value: object) -> object:
    if isinstance(value, dict) and "h" in value:
        buckets, counts, total = value["h"]
        h = Histogram(tuple(buckets))
        h.counts = list(counts)
        h.sum = total
        return h
    if isinstance(value, dict) and "d" in value:
        return {(tuple(k) if isinstance(k, list) else k): _decode(v) for k, v in value["d"]}
    return value


def _add(into: object, other: object) -> object:
    """``into + other`` for counters, histograms and dicts of them (dicts merged by key)."""
    if isinstance(into, Histogram) and isinstance(other, Histogram):
        into.add(other)
        return into
    if isinstance(into, dict) and isinstance(other, dict):
        for k, v in other.items():
            into[k] = _add(into[k], v) if k in into else _copy(v)
        return into
    if isinstance(into, int | float) and isinstance(other, int | float):
        return into + other
    return into


def _copy(value: object) -> object:
    return _decode(_encode(value))


def _fields(obj: object) -> list[str]:
    # Compiled with mypyc a class has no __slots__ at run time; it lists its attributes in
    # __mypyc_attrs__ instead (what mypyc's own pickling support reads).
    cls = type(obj)
    names: tuple[str, ...] = getattr(cls, "__slots__", None) or cls.__mypyc_attrs__  # type: ignore[attr-defined]
    return [f for f in names if f not in _LOCAL]


def dump_registry(reg: Registry) -> dict[str, object]:
    listeners: dict[str, object] = {}
    for name, ls in reg.listeners.items():
        fields = {f: _encode(getattr(ls, f)) for f in _fields(ls)}
        for conn in list(ls.live):
            i, o = conn.live_bytes()
            fields["bytes_in"] = int(fields["bytes_in"]) + i  # type: ignore[call-overload]
            fields["bytes_out"] = int(fields["bytes_out"]) + o  # type: ignore[call-overload]
        listeners[name] = fields
    live = reg.live_messages()
    servers: dict[str, object] = {}
    for sid, ss in reg.servers.items():
        sfields = {f: _encode(getattr(ss, f)) for f in _fields(ss)}
        m_in, m_out = live.get(sid, (0, 0))
        sfields["ws_messages_in"] = ss.ws_messages_in + m_in
        sfields["ws_messages_out"] = ss.ws_messages_out + m_out
        servers[sid] = {"group": ss.group, "server": ss.server, **sfields}
    return {"listeners": listeners, "servers": servers, "retries": dict(reg.retries)}


def load_registry(data: dict[str, object]) -> Registry:
    """A Registry holding a dumped worker's numbers (no live connections, no health, no reloads)."""
    reg = Registry()
    for name, fields in data["listeners"].items():  # type: ignore[attr-defined]
        ls = reg.listener(name)
        for f, v in fields.items():
            setattr(ls, f, _decode(v))
    for sid, fields in data["servers"].items():  # type: ignore[attr-defined]
        ss = reg.server(sid, fields.pop("group"), fields.pop("server"))
        for f, v in fields.items():
            setattr(ss, f, _decode(v))
    reg.retries = dict(data["retries"])  # type: ignore[call-overload]
    return reg


def merge_registries(regs: Iterable[Registry]) -> Registry:
    """One Registry with the sums of ``regs`` (for /status over all workers)."""
    out = Registry()
    for reg in regs:
        for name, ls in reg.listeners.items():
            mine = out.listener(name)
            for f in _fields(ls):
                setattr(mine, f, _add(getattr(mine, f), getattr(ls, f)))
        for sid, ss in reg.servers.items():
            mine_s = out.server(sid, ss.group, ss.server)
            for f in _fields(ss):
                setattr(mine_s, f, _add(getattr(mine_s, f), getattr(ss, f)))
        _add(out.retries, reg.retries)
        for sid, (g, srv, up) in reg.backend_up.items():
            prev = out.backend_up.get(sid)
            out.backend_up[sid] = (g, srv, up + (prev[2] if prev else 0))
        for sid, entry in reg.backend_state.items():
            out.backend_state.setdefault(sid, entry)  # one owner of health and drain states
        for sid, weight in reg.backend_weight.items():
            out.backend_weight.setdefault(sid, weight)  # and of the ramps' view
    return out
