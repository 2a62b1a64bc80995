"""Validation of a parsed config document into the model: ``parse_config(mapping)`` checks
every key (``units`` converts each value) and every rule between keys, and reports *every*
problem at once, each with its place in the file (``server_groups.rs1.servers[1].address``).

This module owns the document's top level and its listeners (TLS, ACL, limits, rules...);
``groups`` owns the server groups. Unknown keys are errors, with a "did you mean" when one is
close: a typo must never be silently ignored.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Any

from ..wire.cidrs import Cidrs, IPNetwork
from .groups import server_groups
from .model import (
    DEFAULT_CLIENT_HEADER_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GZIP_MIN_LENGTH,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    GZIP_TYPES,
    TLS_CLIENT_AUTH,
    TLS_POLICIES,
    AccessLog,
    Acl,
    Address,
    Admin,
    Certificate,
    ClientLimits,
    Config,
    ConfigError,
    Forwarding,
    Gzip,
    Listener,
    Rule,
    Timeouts,
    Tls,
    WebSocketPolicy,
)
from .reader import MISSING, Reader
from .units import (
    _bool,
    _choice,
    _cidr,
    _file_path,
    _int_in,
    _media_types,
    _name,
    _positive_number,
    _prefix,
    _rate,
    _resolver,
    _rule_host,
    _show,
    _size,
    _slb_id,
    _string,
    _token,
    parse_address,
    parse_bandwidth,
    parse_duration,
)

# ---------------------------------------------------------------------------------------------

_TOP_KEYS = ("listeners", "server_groups", "admin", "access_log", "shutdown_timeout", "resolvers")
_LISTENER_KEYS = (
    "name",
    "bind",
    "protocol",
    "server_group",
    "idle_timeout",
    "request_timeout",
    "connect_timeout",
    "x_forwarded_for",
    "rules",
    "client_header_timeout",
    "max_request_line",
    "max_header_size",
    "max_header_count",
    "max_connections",
    "tls",
    "redirect_https",
    "acl",
    "http2",
    "websocket",
    # edge keys (issue 16): _edge
    "x_forwarded_proto",
    "x_forwarded_port",
    "x_forwarded_client_srcport",
    "slb_ip",
    "slb_id",
    "trusted_proxies",
    "limits",
    "bandwidth",
    "gzip",
    "gzip_types",
    "gzip_min_length",
)
_LIMITS_KEYS = ("connections_per_client", "requests_per_second", "burst", "table_size")
_TLS_KEYS = ("cert", "key", "certificates", "policy", "client_ca", "client_auth")
_CERT_KEYS = ("cert", "key")
_ACL_KEYS = ("mode", "cidrs")
_WS_POLICY_KEYS = ("max_message_size", "messages_per_second", "burst")
_RULE_KEYS = ("host", "path", "server_group")
_ADMIN_KEYS = (
    "bind",
    "token",
    "token_file",
    "token_env",
    "token_for_reads",
    "insecure",
    "allowed_hosts",
    "tls",
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ADMIN_HOST = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


def parse_config(doc: Any) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem found."""
    r = Reader()
    if doc is None:
        raise ConfigError(["the config file is empty"])
    top = r.mapping(doc, "", _TOP_KEYS)
    if top is None:
        raise ConfigError(r.problems)

    groups = server_groups(r, top.get("server_groups", MISSING))
    # Every group *declared*, valid or not: a group with its own problems (already reported)
    # must not also make each listener that uses it report "no server group".
    groups_doc = top.get("server_groups")
    declared = {str(k) for k in groups_doc} if isinstance(groups_doc, Mapping) else set()
    listeners = _listeners(r, top.get("listeners", MISSING), declared)

    admin = _admin(r, top.get("admin"))

    access_log = AccessLog()
    log_doc = r.mapping(top.get("access_log"), "access_log", ("enabled", "format", "path"))
    if log_doc is not None:
        d = AccessLog()
        enabled = r.get(log_doc, "enabled", "access_log", _bool, d.enabled)
        fmt = r.get(log_doc, "format", "access_log", _choice("text", "json"), d.format)
        path = r.get(log_doc, "path", "access_log", _string, d.path)
        if enabled is not None and fmt is not None and path is not None:
            access_log = AccessLog(enabled, fmt, path)

    shutdown = r.get(top, "shutdown_timeout", "", parse_duration, DEFAULT_SHUTDOWN_TIMEOUT)
    resolvers = _resolvers(r, top.get("resolvers"))

    for lst in listeners:
        if admin.bind.port != 0 and admin.bind == lst.bind:
            r.error("admin.bind", f"{admin.bind} is already used by listener {lst.name}")

    if r.problems:
        raise ConfigError(r.problems)
    assert shutdown is not None and resolvers is not None
    return Config(
        listeners=tuple(listeners),
        server_groups=tuple(groups),
        admin=admin,
        access_log=access_log,
        shutdown_timeout=shutdown,
        resolvers=resolvers,
    )


def _listeners(r: Reader, doc: Any, group_names: set[str]) -> list[Listener]:
    if doc is MISSING:
        r.error("listeners", "required (a list with at least one listener)")
        return []
    if not isinstance(doc, list) or not doc:
        r.error("listeners", f"expected a non-empty list of listeners, got {_show(doc)}")
        return []
    out: list[Listener] = []
    seen: set[str] = set()
    binds: dict[Address, str] = {}
    for i, item in enumerate(doc):
        path = f"listeners[{i}]"
        m = r.mapping(item, path, _LISTENER_KEYS)
        if m is None:
            continue
        name = r.get(m, "name", path, _name)
        if name is not None:
            if name in seen:
                r.error(f"{path}.name", f"duplicate listener name {name!r}")
            seen.add(name)
        bind = r.get(m, "bind", path, lambda v: parse_address(v, allow_port_zero=True))
        if bind is not None and bind.port != 0:  # port 0: a free port each, never a clash
            if bind in binds:
                r.error(f"{path}.bind", f"{bind} is already used by {binds[bind]}")
            else:
                binds[bind] = f"listener {name}" if name is not None else path
        protocol = r.get(m, "protocol", path, _choice("http", "https"), "http")
        group = r.get(m, "server_group", path, _name)
        if group is not None and group not in group_names:
            known = ", ".join(sorted(group_names)) or "none defined"
            r.error(f"{path}.server_group", f"no server group {group!r} (known: {known})")
        idle = r.get(m, "idle_timeout", path, parse_duration, DEFAULT_IDLE_TIMEOUT)
        request = r.get(m, "request_timeout", path, parse_duration, DEFAULT_REQUEST_TIMEOUT)
        connect = r.get(m, "connect_timeout", path, parse_duration, DEFAULT_CONNECT_TIMEOUT)
        xff = r.get(m, "x_forwarded_for", path, _bool, True)
        rules = _rules(r, m.get("rules"), f"{path}.rules", group_names)
        header = r.get(
            m, "client_header_timeout", path, parse_duration, DEFAULT_CLIENT_HEADER_TIMEOUT
        )
        before = len(r.problems)
        hardening = _hardening(r, m, path, protocol)
        edge = _edge(r, m, path, xff)
        if None in (name, bind, protocol, group, idle, request, connect, xff, rules, header):
            continue
        if len(r.problems) > before:
            continue
        assert name and bind and protocol and group and idle and request and connect and header
        assert xff is not None and rules is not None
        timeouts = Timeouts(idle, request, connect, header)
        out.append(Listener(name, bind, group, protocol, timeouts, xff, rules, **hardening, **edge))
    return out


def _hardening(r: Reader, m: Mapping[str, Any], path: str, protocol: str | None) -> dict[str, Any]:
    """A listener's limits, TLS, https redirect and ACL, as Listener keyword arguments.

    Problems are reported on ``r``; the caller compares problem counts."""
    d = Listener("", Address("", 0), "")
    out: dict[str, Any] = {
        "max_request_line": r.get(
            m, "max_request_line", path, _size(64, 1 << 20), d.max_request_line
        ),
        "max_header_size": r.get(
            m, "max_header_size", path, _size(1024, 1 << 20), d.max_header_size
        ),
        "max_header_count": r.get(
            m, "max_header_count", path, _int_in(1, 10000), d.max_header_count
        ),
        "max_connections": r.get(
            m, "max_connections", path, _int_in(0, 10_000_000), d.max_connections
        ),
    }
    line, size = out["max_request_line"], out["max_header_size"]
    if line is not None and size is not None and line > size:
        r.error(
            f"{path}.max_header_size",
            f"must be at least max_request_line ({line}): the request line is part of the head",
        )
    if "tls" in m:
        if protocol == "http":
            r.error(f"{path}.tls", "only used with protocol: https")
        tls_config = _tls(r, m["tls"], f"{path}.tls")
        if tls_config is not None:
            out["tls"] = tls_config
    elif protocol == "https":
        r.error(f"{path}.tls", "required with protocol: https (cert and key, or certificates)")
    if "redirect_https" in m:
        if protocol == "https":
            r.error(f"{path}.redirect_https", "only used with protocol: http")
        out["redirect_https"] = r.get(m, "redirect_https", path, _int_in(1, 65535))
    if "acl" in m:
        out["acl"] = _acl(r, m["acl"], f"{path}.acl")
    if "http2" in m:
        if protocol == "http":
            # No h2c (cleartext HTTP/2): browsers speak HTTP/2 over TLS only.
            r.error(f"{path}.http2", "only used with protocol: https (HTTP/2 is offered by ALPN)")
        out["http2"] = r.get(m, "http2", path, _bool, True)
    if "websocket" in m:
        out["websocket"] = _ws_policy(r, m["websocket"], f"{path}.websocket")
    return out


def _ws_policy(r: Reader, doc: Any, path: str) -> WebSocketPolicy | None:
    m = r.mapping(doc, path, _WS_POLICY_KEYS)
    if m is None:
        return None
    if "max_message_size" not in m and "messages_per_second" not in m:
        r.error(path, "expected max_message_size and/or messages_per_second")
        return None
    size = r.get(m, "max_message_size", path, _size(1, 1 << 40), 0)
    rate = r.get(m, "messages_per_second", path, _positive_number, 0.0)
    burst = r.get(m, "burst", path, _int_in(1, 1_000_000), None)
    if size is None or rate is None:
        return None
    if burst is None:
        if "burst" in m:
            return None
        burst = max(1, math.ceil(rate))  # a second's worth
    elif not rate:
        r.error(f"{path}.burst", "only used with messages_per_second")
        return None
    return WebSocketPolicy(size, float(rate), burst)


def _tls(r: Reader, doc: Any, path: str) -> Tls | None:
    m = r.mapping(doc, path, _TLS_KEYS)
    if m is None:
        return None
    before = len(r.problems)
    pairs: list[Certificate] = []
    if "certificates" in m:
        if "cert" in m or "key" in m:
            r.error(path, "either cert and key, or certificates: not both")
        items = m["certificates"]
        if not isinstance(items, list) or not items:
            r.error(
                f"{path}.certificates",
                f"expected a non-empty list of {{cert, key}}, got {_show(items)}",
            )
            items = []
        for j, item in enumerate(items):
            where = f"{path}.certificates[{j}]"
            cm = r.mapping(item, where, _CERT_KEYS)
            if cm is not None:
                cert = r.get(cm, "cert", where, _file_path)
                key = r.get(cm, "key", where, _file_path)
                if cert is not None and key is not None:
                    pairs.append(Certificate(cert, key))
    else:
        cert = r.get(m, "cert", path, _file_path)
        key = r.get(m, "key", path, _file_path)
        if cert is not None and key is not None:
            pairs.append(Certificate(cert, key))
    policy = r.get(m, "policy", path, _choice(*TLS_POLICIES), None)
    client_ca = r.get(m, "client_ca", path, _file_path, None)
    client_auth = r.get(m, "client_auth", path, _choice(*TLS_CLIENT_AUTH), None)
    if "client_auth" in m and "client_ca" not in m:
        r.error(f"{path}.client_auth", "needs client_ca (the CAs client certificates chain to)")
    if client_ca is not None and client_auth is None:
        client_auth = "required"  # a CA given means client certificates are wanted
    if len(r.problems) > before:
        return None
    return Tls(tuple(pairs), policy, client_ca, client_auth)


def _edge(r: Reader, m: Mapping[str, Any], path: str, xff: bool | None) -> dict[str, Any]:
    """A listener's forwarding headers, per-client limits, bandwidth cap and gzip (issue 16),
    as Listener keyword arguments. Problems are reported on ``r``."""
    out: dict[str, Any] = {}
    fwd = Forwarding(
        proto=r.get(m, "x_forwarded_proto", path, _bool, None),
        port=r.get(m, "x_forwarded_port", path, _bool, False) or False,
        client_srcport=r.get(m, "x_forwarded_client_srcport", path, _bool, False) or False,
        slb_ip=r.get(m, "slb_ip", path, _bool, False) or False,
        slb_id=r.get(m, "slb_id", path, _slb_id, "") or "",
    )
    if fwd != Forwarding():
        out["forwarding"] = fwd
    if "trusted_proxies" in m:
        cidrs = _cidr_list(r, m["trusted_proxies"], f"{path}.trusted_proxies")
        if cidrs is not None:
            out["trusted_proxies"] = Cidrs(cidrs) if cidrs else None
    if "limits" in m:
        out["limits"] = _limits(r, m["limits"], f"{path}.limits")
    elif "trusted_proxies" in m:
        r.error(f"{path}.trusted_proxies", "only used with limits (it picks the client address)")
    if "bandwidth" in m:
        out["bandwidth"] = r.get(m, "bandwidth", path, parse_bandwidth)
    gzip = r.get(m, "gzip", path, _bool, False)
    types = r.get(m, "gzip_types", path, _media_types, frozenset())
    min_length = r.get(m, "gzip_min_length", path, _size(0, 1 << 30), DEFAULT_GZIP_MIN_LENGTH)
    if not gzip:
        for key in ("gzip_types", "gzip_min_length"):
            if key in m:
                r.error(f"{path}.{key}", "only used with gzip: true")
    elif types is not None and min_length is not None:
        out["gzip"] = Gzip(GZIP_TYPES | types, min_length)
    del xff  # x_forwarded_proto's default follows it at run time (Forwarding.proto None)
    return out


def _limits(r: Reader, doc: Any, path: str) -> ClientLimits | None:
    m = r.mapping(doc, path, _LIMITS_KEYS)
    if m is None:
        return None
    d = ClientLimits()
    conns = r.get(m, "connections_per_client", path, _int_in(0, 1_000_000), 0)
    rate = r.get(m, "requests_per_second", path, _rate, 0.0)
    burst = r.get(m, "burst", path, _int_in(1, 1_000_000), None)
    table = r.get(m, "table_size", path, _int_in(16, 10_000_000), d.table_size)
    if burst is not None and not rate:
        r.error(f"{path}.burst", "only used with requests_per_second")
    if conns == 0 and rate == 0.0 and None not in (conns, rate):
        r.error(path, "limits nothing: set connections_per_client and/or requests_per_second")
        return None
    if conns is None or rate is None or table is None or ("burst" in m and burst is None):
        return None
    if burst is None:
        burst = max(1, math.ceil(rate))  # one second's worth
    return ClientLimits(conns, rate, burst, table)


def _cidr_list(r: Reader, doc: Any, path: str) -> tuple[IPNetwork, ...] | None:
    if not isinstance(doc, list):
        r.error(path, f"expected a list of CIDRs like [10.0.0.0/8], got {_show(doc)}")
        return None
    cidrs: list[IPNetwork] = []
    for i, item in enumerate(doc):
        try:
            cidrs.append(_cidr(item))
        except ValueError as exc:
            r.error(f"{path}[{i}]", str(exc))
    return tuple(cidrs) if len(cidrs) == len(doc) else None


def _acl(r: Reader, doc: Any, path: str) -> Acl | None:
    m = r.mapping(doc, path, _ACL_KEYS)
    if m is None:
        return None
    mode = r.get(m, "mode", path, _choice("allow", "deny"))
    cidrs_doc = m.get("cidrs", MISSING)
    if cidrs_doc is MISSING:
        r.error(f"{path}.cidrs", "required (a list like [10.0.0.0/8, '2001:db8::/32'])")
        return None
    if not isinstance(cidrs_doc, list) or not cidrs_doc:
        r.error(f"{path}.cidrs", f"expected a non-empty list of CIDRs, got {_show(cidrs_doc)}")
        return None
    cidrs: list[IPNetwork] = []
    for i, item in enumerate(cidrs_doc):
        try:
            cidrs.append(_cidr(item))
        except ValueError as exc:
            r.error(f"{path}.cidrs[{i}]", str(exc))
    if mode is None or len(cidrs) != len(cidrs_doc):
        return None
    return Acl(mode, tuple(cidrs))


def _rules(r: Reader, doc: Any, path: str, group_names: set[str]) -> tuple[Rule, ...] | None:
    """``listeners[i].rules``; None when any rule is wrong (every problem reported)."""
    if doc is None:
        return ()
    if not isinstance(doc, list):
        r.error(path, f"expected a list of rules (host, path, server_group), got {_show(doc)}")
        return None
    before = len(r.problems)
    out: list[Rule] = []
    seen: dict[tuple[str | None, str], int] = {}
    for j, item in enumerate(doc):
        rpath = f"{path}[{j}]"
        m = r.mapping(item, rpath, _RULE_KEYS)
        if m is None:
            continue
        if "host" not in m and "path" not in m:
            r.error(rpath, "a rule needs a host, a path or both")
        host = r.get(m, "host", rpath, _rule_host, None)
        prefix = r.get(m, "path", rpath, _prefix, "/")
        group = r.get(m, "server_group", rpath, _name)
        if group is not None and group not in group_names:
            known = ", ".join(sorted(group_names)) or "none defined"
            r.error(f"{rpath}.server_group", f"no server group {group!r} (known: {known})")
        if prefix is None or group is None or (host is None and "host" in m):
            continue
        key = (host, prefix)
        if key in seen:
            shown = f"host {host!r} and path {prefix!r}" if host else f"path {prefix!r}"
            r.error(rpath, f"duplicate rule: {shown} already in rules[{seen[key]}]")
            continue
        seen[key] = j
        out.append(Rule(host, prefix, group))
    return tuple(out) if len(r.problems) == before else None


def _resolvers(r: Reader, doc: Any) -> tuple[Address, ...] | None:
    """``resolvers``: name servers as ``ip`` or ``ip:port`` (``[v6]:port``); port 53 default."""
    if doc is None:
        return ()
    if not isinstance(doc, list):
        r.error("resolvers", f"expected a list like [127.0.0.1:53], got {_show(doc)}")
        return None
    out: list[Address] = []
    for i, item in enumerate(doc):
        try:
            out.append(_resolver(item))
        except ValueError as exc:
            r.error(f"resolvers[{i}]", str(exc))
    return tuple(out) if len(out) == len(doc) else None


# ------------------------------------------------------------------------------ admin


def _admin(r: Reader, doc: Any) -> Admin:
    """The ``admin`` section. The token sources are only named here: control.loading reads
    ``token_file`` / ``token_env`` into ``token`` (the config layer does no such I/O)."""
    m = r.mapping(doc, "admin", _ADMIN_KEYS)
    if m is None:
        return Admin()
    before = len(r.problems)
    d = Admin()
    bind = r.get(m, "bind", "admin", lambda v: parse_address(v, allow_port_zero=True), d.bind)
    token = r.get(m, "token", "admin", _token, "")
    token_file = r.get(m, "token_file", "admin", _file_path, None)
    token_env = r.get(m, "token_env", "admin", _env_name, None)
    for_reads = r.get(m, "token_for_reads", "admin", _bool, False)
    insecure = r.get(m, "insecure", "admin", _bool, False)
    hosts = _admin_hosts(r, m.get("allowed_hosts"))
    tls_config = _tls(r, m["tls"], "admin.tls") if "tls" in m else None
    sources = [k for k in ("token", "token_file", "token_env") if k in m]
    if len(sources) > 1:
        r.error("admin", f"{' and '.join(sources)}: give only one source of the token")
    if len(r.problems) > before:
        return d
    assert bind is not None and token is not None and hosts is not None
    admin = Admin(
        bind=bind,
        token=token,
        token_file=token_file,
        token_env=token_env,
        token_for_reads=bool(for_reads),
        insecure=bool(insecure),
        allowed_hosts=hosts,
        tls=tls_config,
    )
    for problem in admin_problems(admin):
        r.error("admin", problem)
    return admin


def admin_problems(admin: Admin) -> list[str]:
    """The rules between the admin keys: an admin reachable off this machine needs a token
    unless ``insecure`` says it is meant; ``token_for_reads`` needs a token."""
    problems = []
    has_token = bool(admin.token or admin.token_file or admin.token_env)
    if not has_token and not admin.insecure and not bind_is_loopback(admin.bind):
        problems.append(
            f"bind {admin.bind} is reachable from other machines and no token is set: anyone "
            "reaching it could reload or drain every server. Set admin.token, admin.token_file "
            "or admin.token_env (clients then send 'Authorization: Bearer <token>'), bind to "
            "127.0.0.1, or set admin.insecure: true if the network is trusted"
        )
    if admin.token_for_reads and not has_token:
        problems.append("token_for_reads: needs a token (token, token_file or token_env)")
    return problems


def bind_is_loopback(bind: Address) -> bool:
    """Whether only this machine can reach ``bind``: a loopback address or ``localhost``."""
    if bind.host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(bind.host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ValueError(
            f"expected an environment variable name like LB_ADMIN_TOKEN, got {_show(value)}"
        )
    return value


def _admin_hosts(r: Reader, doc: Any) -> tuple[str, ...] | None:
    """``admin.allowed_hosts``: host names or IP addresses, no port (any port matches)."""
    if doc is None:
        return ()
    if not isinstance(doc, list):
        r.error("admin.allowed_hosts", f"expected a list of host names, got {_show(doc)}")
        return None
    out: list[str] = []
    for i, item in enumerate(doc):
        where = f"admin.allowed_hosts[{i}]"
        text = item.strip().lower().rstrip(".") if isinstance(item, str) else ""
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        try:
            out.append(str(ipaddress.ip_address(text)))
            continue
        except ValueError:
            pass
        if _ADMIN_HOST.fullmatch(text):
            out.append(text)
        elif ":" in text or "/" in text:
            r.error(where, f"a host name or IP address without a port or scheme, got {_show(item)}")
        else:
            r.error(where, f"expected a host name like admin.example.com, got {_show(item)}")
    return tuple(out)
