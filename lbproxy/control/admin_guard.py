"""The admin listener's gate: every request passes its checks before a handler sees it.

Owns the three checks that keep the admin from being driven by someone it was not meant for
(the config rule that a bind off loopback needs a token is ``config.top.Admin``'s):

- ``Host``: only the admin's own names are answered (its bind host, ``localhost``, a loopback
  address, the address the connection arrived on, ``admin.allowed_hosts``), so a DNS
  rebinding page (``evil.example`` resolving to 127.0.0.1) cannot read it: 421 otherwise.
- state-changing requests (every method but GET, HEAD and OPTIONS) need ``Content-Type:
  application/json``, which a browser cannot send cross-site without a CORS preflight that
  this admin never grants (no ``Access-Control-Allow-*`` is ever sent): 415 otherwise; and a
  foreign ``Origin`` is refused (403) even then. No Origin (curl, scripts) is fine.
- the bearer token (``admin.token``): on every write and on GET /-/servers, on every page but
  /healthz with ``admin.token_for_reads``: 401 with ``WWW-Authenticate`` otherwise.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

if TYPE_CHECKING:
    from ..config.top import Admin

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/healthz"})  # a liveness probe: never behind the token
LISTING_PATHS = frozenset({"/-/servers"})  # reads that need the token whenever one is set
DEFAULT_PORTS = {"http": 80, "https": 443}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def split_host(value: str) -> tuple[str, int | None]:
    """A ``Host`` (or an Origin's authority) as (host in lower case, without brackets or a
    trailing dot; port or None)."""
    text = value.strip().lower()
    port: int | None = None
    if text.startswith("["):
        end = text.find("]")
        host, rest = (text[1:end], text[end + 1 :]) if end > 0 else (text, "")
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    else:
        host, sep, tail = text.rpartition(":")
        if sep and tail.isdigit() and ":" not in host:
            port = int(tail)
        else:
            host = text
    return host.rstrip("."), port


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def host_allowed(host: str, admin: Admin, local_ip: str | None) -> bool:
    """Whether the admin answers to ``host`` (``split_host``'s host part). The port is not
    checked: a port forward or ssh tunnel changes it, and rebinding is about the name."""
    if host == "localhost" or host in admin.allowed_hosts:
        return True
    if host == admin.bind.host.lower():
        return True
    ip = _ip(host)
    if ip is None:
        return False
    # A literal address cannot be rebound: the page's origin is then that address itself.
    return ip.is_loopback or ip == _ip(admin.bind.host) or ip == _ip(local_ip)


def origin_allowed(origin: str, scheme: str, host_header: str, admin: Admin) -> bool:
    """Whether ``Origin`` is the admin itself: the same scheme, host and port the request was
    made to (``scheme`` and its Host), or a host of ``admin.allowed_hosts``."""
    try:
        o = urlsplit(origin.strip())
        o_host, o_port = split_host(o.netloc)
    except ValueError:
        return False
    if o.scheme.lower() != scheme or not o_host or o.path not in ("", "/"):
        return False  # "null" (a sandboxed frame, a file: page) lands here too
    if o_host in admin.allowed_hosts:
        return True
    host, port = split_host(host_header)
    default = DEFAULT_PORTS.get(scheme)
    return o_host == host and (o_port or default) == (port or default)


def bearer_ok(header: str, token: str) -> bool:
    """``Authorization: Bearer <token>`` (scheme in any case), compared in constant time."""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), token.encode())


def _peer_is_loopback(request: web.Request) -> bool:
    ip = _ip(request.remote)
    return ip is not None and ip.is_loopback


def _local_ip(request: web.Request) -> str | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return str(sockname[0]) if isinstance(sockname, tuple) and sockname else None


def _refuse(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"result": "error", "errors": [message]}, status=status, headers=headers
    )


def check(request: web.Request, admin: Admin) -> web.Response | None:
    """The refusal for ``request`` under ``admin``'s settings, or None to serve it."""
    host_header = request.headers.get("Host", "")
    if host_header:
        host, _ = split_host(host_header)
        if not host_allowed(host, admin, _local_ip(request)):
            return web.Response(
                status=421,
                text=f"421 Misdirected Request: this admin does not answer to Host {host!r} "
                "(admin.allowed_hosts lists the names it does)\n",
            )
    elif not _peer_is_loopback(request):
        # HTTP/1.0 without Host: only from this machine, where no browser page could be
        # the sender after a rebinding (browsers always send Host).
        return web.Response(status=421, text="421 Misdirected Request: a Host is needed\n")
    writes = request.method not in SAFE_METHODS
    if writes:
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, request.scheme, host_header, admin):
            return _refuse(403, f"cross-origin request refused (Origin: {origin[:100]})")
        if request.content_type != "application/json":
            return _refuse(
                415,
                "a request that changes state needs 'Content-Type: application/json' "
                "(curl: -H 'Content-Type: application/json')",
            )
    token = admin.token
    needs_token = writes or request.path in LISTING_PATHS or admin.token_for_reads
    if (
        token
        and needs_token
        and request.path not in OPEN_PATHS
        and request.method != "OPTIONS"
        and not bearer_ok(request.headers.get("Authorization", ""), token)
    ):
        return _refuse(
            401,
            "a valid 'Authorization: Bearer <token>' is needed",
            {"WWW-Authenticate": 'Bearer realm="lbproxy admin"'},
        )
    return None


def middleware(current: Callable[[], Admin]) -> Middleware:
    """The aiohttp middleware applying ``check`` with the admin settings in force now
    (``current``: the running snapshot's, so a reload changes them at once)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = check(request, current())
        if refused is not None:
            return refused
        return await handler(request)

    return guard
