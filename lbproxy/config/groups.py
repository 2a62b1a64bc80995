"""Validation of ``server_groups``: each group's servers, scheduler, health check, sticky
sessions and DNS discovery, into the model's ``ServerGroup`` (see ``validate`` for the rest of
the document and the reader that collects every problem at once)."""

from __future__ import annotations

from typing import Any

from .model import (
    DEFAULT_WEIGHT,
    MIN_DISCOVERY_INTERVAL,
    SCHEDULERS,
    Address,
    Discovery,
    HealthCheck,
    Server,
    ServerGroup,
    StickySession,
)
from .reader import MISSING, Reader
from .units import (
    _bool,
    _check_host,
    _choice,
    _codes,
    _cookie_name,
    _dns_name,
    _drain_code,
    _duration_or_zero,
    _int_in,
    _name,
    _path,
    _prefix,
    _secret,
    _show,
    parse_address,
    parse_duration,
    parse_weight,
)

_GROUP_KEYS = (
    "scheduler",
    "servers",
    "health_check",
    "keepalive_connections",
    "keepalive_timeout",
    "hash_key",
    "sticky_session",
    "drain_timeout",
    "drain_close_code",
    "discovery",
)
_DISCOVERY_KEYS = ("dns", "port", "interval", "weight", "timeout")
_STICKY_KEYS = ("type", "cookie", "cookie_timeout", "socketio", "socketio_path", "secret")
_SERVER_KEYS = ("address", "weight")
_CHECK_KEYS = (
    "enabled",
    "protocol",
    "path",
    "method",
    "host",
    "port",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "expected_codes",
)


def server_groups(r: Reader, doc: Any) -> list[ServerGroup]:
    if doc is MISSING:
        r.error("server_groups", "required (a mapping of group name to group)")
        return []
    m = r.mapping(doc, "server_groups", None)
    if m is None:
        return []
    if not m:
        r.error("server_groups", "expected at least one server group")
    out: list[ServerGroup] = []
    for gname, gdoc in m.items():
        path = f"server_groups.{gname}"
        try:
            _name(gname)
        except ValueError as exc:
            r.error(path, f"bad group name: {exc}")
            continue
        g = r.mapping(gdoc, path, _GROUP_KEYS)
        if g is None:
            continue
        scheduler = r.get(g, "scheduler", path, _choice(*SCHEDULERS), "rr")
        discovery = _discovery(r, g.get("discovery"), f"{path}.discovery")
        servers_doc = g.get("servers", () if "discovery" in g else MISSING)
        servers = _servers(r, servers_doc, f"{path}.servers")
        check = _health_check(r, g.get("health_check"), f"{path}.health_check")
        d = ServerGroup(gname, ())
        keepalive = r.get(
            g, "keepalive_connections", path, _int_in(0, 10000), d.keepalive_connections
        )
        ka_timeout = r.get(g, "keepalive_timeout", path, parse_duration, d.keepalive_timeout)
        hash_key = r.get(g, "hash_key", path, _choice("client_ip", "x_forwarded_for"), d.hash_key)
        drain = r.get(g, "drain_timeout", path, _duration_or_zero, d.drain_timeout)
        drain_code = r.get(g, "drain_close_code", path, _drain_code, d.drain_close_code)
        before = len(r.problems)
        sticky = _sticky(r, g.get("sticky_session"), f"{path}.sticky_session")
        if None in (scheduler, servers, check, keepalive, ka_timeout, hash_key, drain, drain_code):
            continue
        if len(r.problems) > before:
            continue
        assert scheduler and servers is not None and check and keepalive is not None
        assert ka_timeout and hash_key and drain is not None and drain_code is not None
        out.append(
            ServerGroup(
                gname,
                servers,
                scheduler,
                check,
                keepalive,
                ka_timeout,
                hash_key,
                sticky,
                drain,
                drain_code,
                discovery,
            )
        )
    return out


def _sticky(r: Reader, doc: Any, path: str) -> StickySession | None:
    """``server_groups.<name>.sticky_session``; None when absent (no persistence).

    Errors are reported on ``r``; the caller compares problem counts. A key that would have no
    effect (``cookie`` without ``type``, ``socketio_path`` without ``socketio: true``) is an
    error, like an unknown key: the file must not look sticky when it is not.
    """
    if doc is None:
        return None
    m = r.mapping(doc, path, _STICKY_KEYS)
    if m is None:
        return None
    d = StickySession()
    kind = r.get(m, "type", path, _choice("insert", "server"), None)
    if kind == "server" and "cookie" not in m:
        r.error(f"{path}.cookie", "required with type: server (the name of the backend's cookie)")
    cookie = r.get(m, "cookie", path, _cookie_name, d.cookie)
    timeout = r.get(m, "cookie_timeout", path, parse_duration, d.cookie_timeout)
    socketio = r.get(m, "socketio", path, _bool, d.socketio)
    sio_path = r.get(m, "socketio_path", path, _prefix, d.socketio_path)
    secret = r.get(m, "secret", path, _secret, d.secret)
    if "secret" in m and kind != "insert":
        r.error(f"{path}.secret", "only used with type: insert")
    if "type" not in m:
        for key in ("cookie", "cookie_timeout"):
            if key in m:
                r.error(f"{path}.{key}", "only used with type: insert or server")
        if socketio is False:
            r.error(
                path,
                "enables nothing: set type (insert or server) and/or socketio: true"
                " (leave sticky_session out for no persistence)",
            )
    if socketio is False and "socketio_path" in m:
        r.error(f"{path}.socketio_path", "only used with socketio: true")
    if cookie is None or timeout is None or socketio is None or sio_path is None:
        return None
    if secret is None:
        return None
    return StickySession(kind, cookie, timeout, socketio, sio_path, secret)


def _discovery(r: Reader, doc: Any, path: str) -> Discovery | None:
    """``server_groups.<name>.discovery``; None when absent or wrong (problems on ``r``)."""
    if doc is None:
        return None
    m = r.mapping(doc, path, _DISCOVERY_KEYS)
    if m is None:
        return None
    d = Discovery("")
    name = r.get(m, "dns", path, _dns_name)
    srv = name is not None and name.startswith("_")
    if srv and "port" in m:
        r.error(f"{path}.port", "not used with an SRV name (the records carry the ports)")
    elif name is not None and not srv and "port" not in m:
        r.error(f"{path}.port", "required with an A/AAAA name (the servers' port)")
    port = r.get(m, "port", path, _int_in(1, 65535), 0) if not srv else 0
    if srv and "weight" in m:
        r.error(f"{path}.weight", "not used with an SRV name (the records carry the weights)")
    interval = r.get(m, "interval", path, parse_duration, d.interval)
    if interval is not None and interval < MIN_DISCOVERY_INTERVAL:
        r.error(f"{path}.interval", f"must be at least {MIN_DISCOVERY_INTERVAL:g}s")
        interval = None
    weight = r.get(m, "weight", path, parse_weight, d.weight)
    timeout = r.get(m, "timeout", path, parse_duration, d.timeout)
    if timeout is not None and timeout > 30:
        r.error(f"{path}.timeout", "must be at most 30s")
        timeout = None
    if None in (name, port, interval, weight, timeout) or (srv and ("port" in m or "weight" in m)):
        return None
    assert name and port is not None and interval and weight is not None and timeout
    return Discovery(name, port, interval, weight, timeout)


def _servers(r: Reader, doc: Any, path: str) -> tuple[Server, ...] | None:
    if doc is MISSING:
        r.error(path, "required (a list of servers, may be empty), or discovery")
        return None
    if doc is None or doc == ():
        return ()
    if not isinstance(doc, list):
        r.error(path, f"expected a list of servers, got {_show(doc)}")
        return None
    out: list[Server] = []
    seen: set[Address] = set()
    ok = True
    for i, item in enumerate(doc):
        spath = f"{path}[{i}]"
        if isinstance(item, str):  # shorthand: "- 127.0.0.1:5001"
            item = {"address": item}
        m = r.mapping(item, spath, _SERVER_KEYS)
        if m is None:
            ok = False
            continue
        address = r.get(m, "address", spath, parse_address)
        weight = r.get(m, "weight", spath, parse_weight, DEFAULT_WEIGHT)
        if address is None or weight is None:
            ok = False
            continue
        if address in seen:
            r.error(f"{spath}.address", f"duplicate server {address}")
            ok = False
        seen.add(address)
        out.append(Server(address, weight))
    return tuple(out) if ok else None


def _health_check(r: Reader, doc: Any, path: str) -> HealthCheck | None:
    m = r.mapping(doc, path, _CHECK_KEYS)
    if m is None:
        return None
    d = HealthCheck()
    values = (
        r.get(m, "enabled", path, _bool, d.enabled),
        r.get(m, "protocol", path, _choice("http", "tcp", "websocket"), d.protocol),
        r.get(m, "path", path, _path, d.path),
        r.get(m, "method", path, _choice("HEAD", "GET"), d.method),
        r.get(m, "host", path, _check_host, d.host),
        r.get(m, "port", path, _int_in(0, 65535), d.port),
        r.get(m, "interval", path, parse_duration, d.interval),
        r.get(m, "timeout", path, parse_duration, d.timeout),
        r.get(m, "healthy_threshold", path, _int_in(1, 100), d.healthy_threshold),
        r.get(m, "unhealthy_threshold", path, _int_in(1, 100), d.unhealthy_threshold),
        r.get(m, "expected_codes", path, _codes, d.expected_codes),
    )
    if any(v is None for v in values):
        return None
    if values[1] == "websocket":
        # The check is an upgrade: always a GET, and only 101 passes.
        unused = [key for key in ("method", "expected_codes") if key in m]
        for key in unused:
            r.error(f"{path}.{key}", "not used with protocol: websocket (a GET expecting 101)")
        if unused:
            return None
    return HealthCheck(*values)  # type: ignore[arg-type]
