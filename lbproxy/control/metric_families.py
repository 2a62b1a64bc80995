"""Every metric family lbproxy exposes, one row each, and the Collector that renders them.

``FAMILIES`` names each family once: its name, help, type, labels and ``source``, the function
that reads its samples out of the registries (``metrics``) when /metrics is scraped. The data
path never sees this module; the README's metrics table lists the same rows
(tests/unit/test_metrics.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector as _PromCollector

from ..core.metrics import BACKEND_STATES, Histogram, Registry, ServerStats, merge_registries

# A family's type, as Prometheus names it.
Kind = Literal["counter", "gauge", "histogram"]
COUNTER: Final[Kind] = "counter"
GAUGE: Final[Kind] = "gauge"
HISTOGRAM: Final[Kind] = "histogram"

# One sample: its label values (in the family's label order) and a number, or a Histogram for
# a histogram family.
Sample = tuple[list[str], int | float | Histogram]


class Scrape:
    """What the sources read at one scrape: the registries and their sum."""

    __slots__ = ("first", "regs", "total")

    def __init__(self, regs: list[Registry]) -> None:
        self.regs = regs
        # One set of numbers: the sum over the registries (one per worker process, or just
        # this one), by the same rules that carry a dead worker's counters.
        self.total = merge_registries(regs)
        # Reloads, health and DNS discovery happen in one process: the first registry's.
        self.first = regs[0] if regs else None


Source = Callable[[Scrape], list[Sample]]


def _flat(prefix: list[str], value: Any) -> list[Sample]:
    """A number as one sample; a dict (by label value or tuple of them) as one per key, sorted."""
    if not isinstance(value, dict):
        return [(prefix, value)]
    out: list[Sample] = []
    for key in sorted(value):
        out.append(([*prefix, *key] if isinstance(key, tuple) else [*prefix, key], value[key]))
    return out


class PerListener:
    """A ListenerStats attribute of every listener, labelled listener first."""

    __slots__ = ("attr",)

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __call__(self, scrape: Scrape) -> list[Sample]:
        out: list[Sample] = []
        for name, ls in sorted(scrape.total.listeners.items()):
            out.extend(_flat([name], getattr(ls, self.attr)))
        return out


class PerServer:
    """A ServerStats attribute of every server, labelled server_group, server, then its keys
    (or, with ``key_first``, its key first: the listener of ws_active and ws_total)."""

    __slots__ = ("attr", "key_first")

    def __init__(self, attr: str, key_first: bool = False) -> None:
        self.attr = attr
        self.key_first = key_first

    def __call__(self, scrape: Scrape) -> list[Sample]:
        out: list[Sample] = []
        for ss in sorted(scrape.total.servers.values(), key=_server_key):
            value = getattr(ss, self.attr)
            if self.key_first:
                out.extend(([k, ss.group, ss.server], value[k]) for k in sorted(value))
            else:
                out.extend(_flat([ss.group, ss.server], value))
        return out


def _server_key(ss: ServerStats) -> tuple[str, str]:
    return (ss.group, ss.server)


def _ws_messages(scrape: Scrape) -> list[Sample]:
    out: list[Sample] = []
    for name, ls in sorted(scrape.total.listeners.items()):
        out += [([name, "in"], ls.ws_messages_in), ([name, "out"], ls.ws_messages_out)]
    return out


def _bytes(scrape: Scrape) -> list[Sample]:
    out: list[Sample] = []
    for name, ls in sorted(scrape.total.listeners.items()):
        # Open connections' bytes live on the connections, not in the counters.
        bin_, bout = ls.bytes_in, ls.bytes_out
        for reg in scrape.regs:
            for conn in list(reg.listeners[name].live) if name in reg.listeners else ():
                i, o = conn.live_bytes()
                bin_ += i
                bout += o
        out += [([name, "in"], bin_), ([name, "out"], bout)]
    return out


def _backend_up(scrape: Scrape) -> list[Sample]:
    return [([g, srv], up) for g, srv, up in sorted(scrape.total.backend_up.values())]


def _backend_weight(scrape: Scrape) -> list[Sample]:
    return [([g, srv], w) for g, srv, w in sorted(scrape.total.backend_weight.values())]


def _backend_state(scrape: Scrape) -> list[Sample]:
    out: list[Sample] = []
    for g, srv, current in sorted(scrape.total.backend_state.values()):
        out.extend(([g, srv, st], 1 if st == current else 0) for st in BACKEND_STATES)
    return out


def _retries(scrape: Scrape) -> list[Sample]:
    return _flat([], scrape.total.retries)


def _reloads(scrape: Scrape) -> list[Sample]:
    rl = scrape.first.reloads if scrape.first else None
    return [(["success"], rl.success), (["failure"], rl.failure)] if rl else []


def _last_reload_success(scrape: Scrape) -> list[Sample]:
    return [([], scrape.first.reloads.last_success)] if scrape.first else []


def _last_reload_timestamp(scrape: Scrape) -> list[Sample]:
    return [([], scrape.first.reloads.last_timestamp)] if scrape.first else []


def _certificates(scrape: Scrape) -> list[Sample]:
    return _flat([], scrape.first.certificates) if scrape.first else []


def _dns_lookups(scrape: Scrape) -> list[Sample]:
    return _flat([], scrape.first.dns_lookups) if scrape.first else []


def _cluster_instances(scrape: Scrape) -> list[Sample]:
    c = scrape.first.cluster if scrape.first else None
    return [([], c[0])] if c is not None else []


def _cluster_redis_up(scrape: Scrape) -> list[Sample]:
    c = scrape.first.cluster if scrape.first else None
    return [([], c[1])] if c is not None else []


def _discovered(scrape: Scrape) -> list[Sample]:
    first = scrape.first
    if first is None:
        return []
    return [
        ([g, srv], 1 if sid in first.discovered else 0)
        for sid, (g, srv, _) in sorted(first.backend_up.items())
    ]


@dataclass(frozen=True)
class Family:
    """One metric family. ``name`` is without the ``_total`` a counter is exposed with."""

    name: str
    help: str
    kind: Kind
    labels: tuple[str, ...]
    source: Source

    def build(self, scrape: Scrape) -> Metric:
        """The family with this scrape's samples (a histogram source yields Histograms)."""
        labels = list(self.labels)
        if self.kind == HISTOGRAM:
            hist = HistogramMetricFamily(self.name, self.help, labels=labels)
            for values, h in self.source(scrape):
                assert isinstance(h, Histogram), self.name
                hist.add_metric(values, h.cumulative(), h.sum)
            return hist
        cls = CounterMetricFamily if self.kind == COUNTER else GaugeMetricFamily
        fam = cls(self.name, self.help, labels=labels)
        for values, n in self.source(scrape):
            assert not isinstance(n, Histogram), self.name
            fam.add_metric(values, n)
        return fam


_L, _G, _S = "listener", "server_group", "server"

# In exposition order; README's metrics table lists the same (tests/unit/test_metrics.py).
FAMILIES: tuple[Family, ...] = (
    Family(
        "lbproxy_requests",
        "HTTP requests answered",
        COUNTER,
        (_L, _G, _S, "code"),
        PerListener("requests"),
    ),
    Family(
        "lbproxy_requests_by_protocol",
        "HTTP requests answered, by the protocol the client spoke (HTTP/1.0, HTTP/1.1, HTTP/2)",
        COUNTER,
        (_L, "protocol"),
        PerListener("protocols"),
    ),
    Family(
        "lbproxy_http2_rapid_reset_closes",
        "HTTP/2 connections closed (GOAWAY ENHANCE_YOUR_CALM) for resetting streams too fast",
        COUNTER,
        (_L,),
        PerListener("h2_rapid_resets"),
    ),
    Family(
        "lbproxy_request_duration_seconds",
        "Time from request head to the end of the response",
        HISTOGRAM,
        (_L, _G),
        PerListener("request_duration"),
    ),
    Family(
        "lbproxy_upstream_response_seconds",
        "Time from sending a request to receiving the backend's response head",
        HISTOGRAM,
        (_G, _S),
        PerServer("upstream_response"),
    ),
    Family(
        "lbproxy_connections_active",
        "Client connections open",
        GAUGE,
        (_L,),
        PerListener("connections_active"),
    ),
    Family(
        "lbproxy_connections",
        "Client connections accepted",
        COUNTER,
        (_L,),
        PerListener("connections_total"),
    ),
    Family(
        "lbproxy_connections_refused",
        "Client connections closed at once, without reading from them",
        COUNTER,
        (_L, "reason"),
        PerListener("connections_refused"),
    ),
    Family(
        "lbproxy_tls_handshake_failures",
        "TLS handshakes of client connections that failed, by why",
        COUNTER,
        (_L, "reason"),
        PerListener("tls_failures"),
    ),
    Family(
        "lbproxy_backend_tls_handshake_failures",
        "TLS handshakes to backends (connections and health checks) that failed, by why",
        COUNTER,
        (_G, _S, "reason"),
        PerServer("tls_failures"),
    ),
    Family(
        "lbproxy_websockets_active",
        "WebSocket tunnels open",
        GAUGE,
        (_L, _G, _S),
        PerServer("ws_active", key_first=True),
    ),
    Family(
        "lbproxy_websockets",
        "WebSocket tunnels established",
        COUNTER,
        (_L, _G, _S),
        PerServer("ws_total", key_first=True),
    ),
    Family(
        "lbproxy_websocket_duration_seconds",
        "WebSocket tunnel lifetime",
        HISTOGRAM,
        (_L, _G),
        PerListener("ws_duration"),
    ),
    Family(
        "lbproxy_websocket_closes",
        "WebSocket tunnels closed, by who closed them",
        COUNTER,
        (_L, "reason"),
        PerListener("ws_closes"),
    ),
    Family(
        "lbproxy_websocket_messages",
        "WebSocket data messages relayed (a fragmented message counts once)",
        COUNTER,
        (_L, "direction"),
        _ws_messages,
    ),
    Family(
        "lbproxy_websocket_close_codes",
        "WebSocket close frames, by who sent them and their code",
        COUNTER,
        (_L, "side", "code"),
        PerListener("ws_close_codes"),
    ),
    Family(
        "lbproxy_websocket_policy_closes",
        "WebSocket tunnels closed because the client broke the listener's message policy",
        COUNTER,
        (_L, "reason"),
        PerListener("ws_policy"),
    ),
    Family(
        "lbproxy_websockets_drained",
        "WebSocket tunnels the proxy closed because their server was draining",
        COUNTER,
        (_G, _S),
        PerServer("ws_drained"),
    ),
    Family(
        "lbproxy_websockets_rebalanced",
        "WebSocket tunnels the proxy moved off their server (rebalance, shed)",
        COUNTER,
        (_G, _S),
        PerServer("ws_rebalanced"),
    ),
    Family(
        "lbproxy_websocket_ends",
        "WebSocket tunnels to a server ended, by the first close frame's code: 1000, 1001, "
        "other, or 1006 when no close frame passed (the connection was dropped)",
        COUNTER,
        (_G, _S, "class"),
        PerServer("ws_close_classes"),
    ),
    Family(
        "lbproxy_bytes",
        "Bytes from clients (in) and to clients (out)",
        COUNTER,
        (_L, "direction"),
        _bytes,
    ),
    Family(
        "lbproxy_backend_up",
        "1 when the server takes traffic",
        GAUGE,
        (_G, _S),
        _backend_up,
    ),
    Family(
        "lbproxy_backend_state",
        "1 for the server's current state (draining over health)",
        GAUGE,
        (_G, _S, "state"),
        _backend_state,
    ),
    Family(
        "lbproxy_backend_effective_weight",
        "The weight the schedulers use: the server's weight, less while it ramps (slow start)",
        GAUGE,
        (_G, _S),
        _backend_weight,
    ),
    Family(
        "lbproxy_health_checks",
        "Active health checks by result",
        COUNTER,
        (_G, _S, "result"),
        PerServer("health_checks"),
    ),
    Family(
        "lbproxy_upstream_errors",
        "Failures talking to backends",
        COUNTER,
        (_G, _S, "kind"),
        PerServer("errors"),
    ),
    Family(
        "lbproxy_retries",
        "Requests retried on another server",
        COUNTER,
        (_G,),
        _retries,
    ),
    Family(
        "lbproxy_config_reloads",
        "Config reloads by result",
        COUNTER,
        ("result",),
        _reloads,
    ),
    Family(
        "lbproxy_config_last_reload_success",
        "1 when the last reload succeeded",
        GAUGE,
        (),
        _last_reload_success,
    ),
    Family(
        "lbproxy_config_last_reload_timestamp_seconds",
        "Time of the last reload attempt",
        GAUGE,
        (),
        _last_reload_timestamp,
    ),
    Family(
        "lbproxy_tls_certificate_expiry_timestamp_seconds",
        "When each certificate of the config in force expires (notAfter, Unix seconds)",
        GAUGE,
        (_L, "certificate"),
        _certificates,
    ),
    Family(
        "lbproxy_dns_lookups",
        "DNS discovery lookups by result (ok, nxdomain, timeout, error)",
        COUNTER,
        (_G, "result"),
        _dns_lookups,
    ),
    Family(
        "lbproxy_backend_discovered",
        "1 for a server found through DNS discovery, 0 for one written in the file",
        GAUGE,
        (_G, _S),
        _discovered,
    ),
    Family(
        "lbproxy_cluster_instances",
        "With cluster: the live instances of the fleet this one sees (itself included)",
        GAUGE,
        (),
        _cluster_instances,
    ),
    Family(
        "lbproxy_cluster_limit_fallbacks",
        "limits.scope cluster while Redis is unreachable: requests decided by this instance "
        "alone (mode open) or refused with 429 (mode closed)",
        COUNTER,
        ("listener", "mode"),
        PerListener("cluster_fallbacks"),
    ),
    Family(
        "lbproxy_cluster_redis_up",
        "With cluster: 1 while the fleet's Redis answers, 0 while this instance is degraded",
        GAUGE,
        (),
        _cluster_redis_up,
    ),
)


class Collector(_PromCollector):
    """Exposes one Registry, or the sum of several (one per worker), as ``FAMILIES``."""

    def __init__(self, registries: Iterable[Registry] | Registry) -> None:
        self._registries = registries

    def _all(self) -> list[Registry]:
        r = self._registries
        return [r] if isinstance(r, Registry) else list(r)

    def collect(self) -> Iterator[Metric]:
        scrape = Scrape(self._all())
        for family in FAMILIES:
            yield family.build(scrape)
