"""The declaration of how the proxy reaches a group's servers: the sections ``health_check``
(active checks) and ``tls`` (TLS to the servers) of ``server_groups.<name>``, each key once
with its type, default and description, and the rules between keys (``_rules``); ``groups``
holds them in ``ServerGroup``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from .addresses import DnsName_
from .declare import Problem, declared
from .quantities import Duration, integer
from .words import Bool, CheckHost, Codes, FilePath_, String_, UrlPath, choice


@declared
@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health checks of every server of a group."""

    enabled: Annotated[
        Bool,
        Field(
            description=(
                "`false`: every server with weight > 0 takes traffic; failures only cause a "
                "retry on the next server"
            ),
        ),
    ] = True
    protocol: Annotated[
        Annotated[str, choice("http", "tcp", "websocket")],
        Field(
            description=(
                "`http`; `tcp` (a connect is enough); or `websocket`, for backends that serve "
                "only WebSockets (and answer a plain request with 400): a real upgrade (`GET "
                "path` with `Upgrade: websocket`) that must get `101` with the right "
                "`Sec-WebSocket-Accept`, then a clean close (a masked close frame, code 1000; "
                "the server's close frame or the end of the connection must follow within "
                "`timeout`). `method` and `expected_codes` are not used with it (setting them "
                "is an error)"
            ),
        ),
    ] = "http"
    path: Annotated[
        UrlPath,
        Field(
            description=("request path (http, websocket)"),
        ),
    ] = "/"
    method: Annotated[
        Annotated[str, choice("HEAD", "GET")],
        Field(
            description=("`HEAD` or `GET` (http)"),
        ),
    ] = "HEAD"
    host: Annotated[
        CheckHost,
        Field(
            description=(
                "`Host` header to send (http, websocket); empty means the server's own `host:port`"
            ),
        ),
    ] = ""
    port: Annotated[
        Annotated[int, integer(0, 65535)],
        Field(
            description=("port to check; 0 means the server's own port"),
        ),
    ] = 0
    interval: Annotated[
        Duration,
        Field(
            description=(
                "time between checks of one server (checks of a group are spread over it)"
            ),
        ),
    ] = 2.0
    timeout: Annotated[
        Duration,
        Field(
            description=("a check that takes longer fails"),
        ),
    ] = 5.0
    healthy_threshold: Annotated[
        Annotated[int, integer(1, 100)],
        Field(
            description=(
                "consecutive successes that bring a down server up (a server never up yet "
                "needs one)"
            ),
        ),
    ] = 3
    unhealthy_threshold: Annotated[
        Annotated[int, integer(1, 100)],
        Field(
            description=("consecutive failures that take an up server down"),
        ),
    ] = 3
    expected_codes: Annotated[
        Codes,
        Field(
            description=(
                "status classes `http_2xx`..`http_5xx` and/or exact codes like `200` (http)"
            ),
        ),
    ] = ("http_2xx", "http_3xx")

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        if raw.get("protocol") != "websocket":
            return []
        # The check is an upgrade: always a GET, and only 101 passes.
        return [
            ((key,), "not used with protocol: websocket (a GET expecting 101)")
            for key in ("method", "expected_codes")
            if key in raw
        ]


@declared
@dataclass(frozen=True, slots=True, kw_only=True)
class BackendTls:
    """``server_groups.<name>.tls``: TLS from the proxy to the group's servers (requests,
    WebSocket upgrades and health checks alike)."""

    ca: Annotated[
        Annotated[str | None, FilePath_],
        Field(
            description="PEM file of the CA certificate(s) the servers' certificates chain to",
            json_schema_extra={"x-default": "the system's CA store"},
        ),
    ] = None
    verify: Annotated[
        Bool,
        Field(
            description=(
                "check the server's certificate (chain and name); `false` takes any (the "
                "traffic is encrypted, the server not authenticated)"
            ),
        ),
    ] = True
    server_name: Annotated[
        Annotated[str | None, DnsName_],
        Field(
            description=("the name sent in SNI and checked against the server's certificate"),
            json_schema_extra={"x-default": "the server's host (its address when an IP)"},
        ),
    ] = None
    cert: Annotated[
        Annotated[str | None, FilePath_],
        Field(description="mutual TLS: PEM file of the proxy's client certificate chain"),
    ] = None
    key: Annotated[
        Annotated[str | None, FilePath_],
        Field(description="mutual TLS: PEM file of its private key"),
    ] = None
    min_version: Annotated[
        Annotated[str, choice("1.2", "1.3")],
        Field(description="the lowest TLS version spoken to the servers"),
    ] = "1.2"
    ciphers: Annotated[
        Annotated[str | None, String_],
        Field(description="OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites: OpenSSL's)"),
    ] = None
    digest: SkipJsonSchema[str] = ""  # sha256 of the files, filled in by the loader

    _internal = ("digest",)

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.ca, self.cert, self.key) if f is not None)

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        out: list[Problem] = []
        for a, b in (("cert", "key"), ("key", "cert")):
            if a in raw and b not in raw:
                out.append(((b,), f"required with {a} (mutual TLS needs both)"))
        if raw.get("verify") is False and "ca" in raw:
            out.append((("ca",), "only used with verify: true"))
        return out
