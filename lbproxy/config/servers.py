"""The declaration of a group's servers: ``servers[]`` (``Server``) and ``discovery``
(``Discovery``, the servers found in DNS), with their types, defaults and descriptions.

Apart from ``groups`` (the rest of a group) because DNS discovery (``core.dns``) builds
these two and nothing else of a group: it imports them from here, a level below the group.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from .addresses import Address_, DnsName, _dns_name
from .declare import Problem, declared, given
from .model import (
    DEFAULT_DISCOVERY_INTERVAL,
    DEFAULT_DNS_TIMEOUT,
    DEFAULT_WEIGHT,
    MIN_DISCOVERY_INTERVAL,
)
from .quantities import Duration, Port, Weight, parse_duration


@declared
@dataclass(frozen=True, slots=True)
class Server:
    """A backend; ``- 127.0.0.1:5001`` is short for ``- address: 127.0.0.1:5001``."""

    address: Annotated[
        Address_,
        Field(
            description=(
                "`host:port` of the backend; `- 127.0.0.1:5001` is short for `- address: "
                "127.0.0.1:5001`. A host name is resolved when the config is loaded (at start "
                "and on every reload) through the system's resolver (`/etc/hosts` too), and "
                "connects go to its addresses, tried in order: no lookup per connect. A name "
                "that does not resolve then is looked up at each connect, and logged. For "
                "names whose addresses change, use `discovery`"
            ),
        ),
    ]
    weight: Annotated[
        Weight,
        Field(
            description=("0..100; 0 makes the server **draining** (see [Draining](#draining))"),
        ),
    ] = DEFAULT_WEIGHT
    discovered: SkipJsonSchema[bool] = False  # from DNS (``discovery``), not written in the file

    _internal = ("discovered",)
    _shorthand = "address"


@declared
@dataclass(frozen=True, slots=True)
class Discovery:
    """A group's servers from DNS: every address of ``dns`` becomes a server ``ip:port``.

    A name whose first label starts with ``_`` (``_chat._tcp.example.com``) is looked up as
    SRV (each record names its port and weight); any other name as A and AAAA, with ``port``
    and ``weight`` for every address.
    """

    dns: Annotated[
        DnsName,
        Field(
            description=(
                "the name to look up. One whose first label starts with `_` "
                "(`_chat._tcp.example.com`) is an SRV name; any other is looked up as A and "
                "AAAA at once"
            ),
        ),
    ]
    port: Annotated[
        Port,
        Field(
            description=("the port of every address found; not allowed with SRV"),
            json_schema_extra={"x-default": "required with A/AAAA"},
        ),
    ] = 0
    interval: Annotated[
        Duration,
        Field(
            description=(
                "look again at least this often: sooner when the records' TTL is shorter, "
                "never more than once a second (at least `1s`)"
            ),
        ),
    ] = DEFAULT_DISCOVERY_INTERVAL
    weight: Annotated[
        Weight,
        Field(
            description=("weight of every A/AAAA server (0..100); not allowed with SRV"),
        ),
    ] = DEFAULT_WEIGHT
    timeout: Annotated[
        Duration,
        Field(
            description=(
                "one lookup, retries included (at most `30s`); past it the lookup counts as "
                "`timeout`"
            ),
        ),
    ] = DEFAULT_DNS_TIMEOUT

    @property
    def srv(self) -> bool:
        return self.dns.startswith("_")

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        out: list[Problem] = []
        name = given(raw, "dns", _dns_name)
        srv = name is not None and name.startswith("_")
        if srv and "port" in raw:
            out.append((("port",), "not used with an SRV name (the records carry the ports)"))
        elif name is not None and not srv and "port" not in raw:
            out.append((("port",), "required with an A/AAAA name (the servers' port)"))
        if srv and "weight" in raw:
            out.append((("weight",), "not used with an SRV name (the records carry the weights)"))
        interval = given(raw, "interval", parse_duration)
        if interval is not None and interval < MIN_DISCOVERY_INTERVAL:
            out.append((("interval",), f"must be at least {MIN_DISCOVERY_INTERVAL:g}s"))
        timeout = given(raw, "timeout", parse_duration)
        if timeout is not None and timeout > 30:
            out.append((("timeout",), "must be at most 30s"))
        return out
