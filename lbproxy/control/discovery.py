"""DNS service discovery, the I/O: one lookup loop per server group with ``discovery``.

Owns:
- ``Lookups``: the asynchronous resolver (dnspython's asyncio resolver: one UDP exchange on
  the event loop per query, no thread per lookup), asking the top-level ``resolvers`` or the
  system's name servers; ``addresses`` (A and AAAA at once) and ``srv`` (SRV, then the
  targets' addresses from the additional section or their own lookups) turn every outcome
  into a ``dnsstate.Answer``, never an exception;
- ``Discovery``: the loop tasks (``apply`` starts, restarts or stops them to follow a config;
  ``close`` stops them all). Each loop counts its lookups in the registry, feeds the group's
  ``dnsstate.Tracker`` and, when the set changes, awaits ``on_change`` — the proxy then
  rebuilds its snapshot exactly as on a reload. Every decision lives in ``dnsstate``.

Only the process that runs the health checks runs discovery (alone: that process; with
workers: the supervisor, which hands the servers found to every worker).

Also here: ``resolve_names``, which resolves the host names written under ``servers`` once
per config load (start and every reload) through the system's resolver (``/etc/hosts``
included), so that connects go to addresses instead of looking the name up each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from ..config.model import DEFAULT_DNS_TIMEOUT, Address
from ..config.servers import Discovery as Spec
from ..config.servers import Server
from ..core import metrics
from ..core.dns import Answer, Discovered, SrvRecord, Tracker, address_servers, srv_servers

if TYPE_CHECKING:
    from ..config.top import Config
    from ..core.snapshot import ServerState

log = logging.getLogger("lbproxy.control.discovery")

OnChange = Callable[[str, Spec, tuple[Server, ...]], Awaitable[None]]


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


class Lookups:
    """Queries for discovery, asking ``resolvers`` (empty: /etc/resolv.conf)."""

    def __init__(self, resolvers: tuple[Address, ...]) -> None:
        self.problem = ""
        try:
            r = dns.asyncresolver.Resolver(configure=not resolvers)
        except dns.exception.DNSException as exc:  # no /etc/resolv.conf, say
            r = dns.asyncresolver.Resolver(configure=False)
            self.problem = f"no name servers: {exc}"
        if resolvers:
            r.nameservers = [dns.nameserver.Do53Nameserver(a.host, a.port) for a in resolvers]
        r.cache = None  # every loop turn asks again; the TTL is what paces it
        self.resolver = r

    async def _query(
        self, name: str, rdtype: str, timeout: float
    ) -> tuple[str, dns.resolver.Answer | None, str]:
        """(result, answer or None, detail) for one question."""
        if self.problem:
            return "error", None, self.problem
        try:
            answer = await self.resolver.resolve(
                name, rdtype, search=False, lifetime=timeout, raise_on_no_answer=True
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return "nxdomain", None, ""
        except dns.exception.Timeout:
            return "timeout", None, f"no answer within {timeout:g}s"
        except dns.exception.DNSException as exc:
            return "error", None, str(exc)
        except OSError as exc:
            return "error", None, exc.strerror or str(exc)
        return "ok", answer, ""

    async def _ips(self, name: str, timeout: float) -> tuple[str, list[str], float | None, str]:
        """A and AAAA of ``name`` together: any failure of either fails the whole."""
        # gather(*list), not gather(a, b): typed as a tuple, the latter returns a list, which
        # compiled code would refuse.
        results = await asyncio.gather(
            *[self._query(name, "A", timeout), self._query(name, "AAAA", timeout)]
        )
        for bad in ("timeout", "error"):
            for result, _, detail in results:
                if result == bad:
                    return bad, [], None, detail
        ips: list[str] = []
        ttls: list[float] = []
        for result, answer, _ in results:
            if result == "ok" and answer is not None and answer.rrset is not None:
                ips.extend(rd.address for rd in answer.rrset)
                ttls.append(answer.rrset.ttl)
        if not ips:
            return "nxdomain", [], None, ""
        return "ok", ips, min(ttls), ""

    async def addresses(self, spec: Spec) -> Answer:
        result, ips, ttl, detail = await self._ips(spec.dns, spec.timeout)
        if result != "ok":
            return Answer(result, detail=detail)
        return Answer("ok", address_servers(ips, spec.port, spec.weight), ttl)

    async def srv(self, spec: Spec) -> Answer:
        result, answer, detail = await self._query(spec.dns, "SRV", spec.timeout)
        if result != "ok" or answer is None or answer.rrset is None:
            return Answer(result, detail=detail)
        records = [
            SrvRecord(rd.priority, rd.weight, rd.port, _text(rd.target)) for rd in answer.rrset
        ]
        ttls: list[float] = [answer.rrset.ttl]
        addresses: dict[str, list[str]] = {}
        for rrset in answer.response.additional:
            if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                addresses.setdefault(_text(rrset.name), []).extend(rd.address for rd in rrset)
                ttls.append(rrset.ttl)
        missing = sorted({r.target for r in records if r.target and r.target not in addresses})
        found = await asyncio.gather(*(self._ips(t, spec.timeout) for t in missing))
        for target, (res, ips, ttl, why) in zip(missing, found, strict=True):
            if res in ("timeout", "error"):
                return Answer(res, detail=f"{target}: {why}")
            addresses[target] = ips
            if ttl is not None:
                ttls.append(ttl)
        return Answer("ok", srv_servers(records, addresses), min(ttls))


class Discovery:
    """The lookup loops of every group with ``discovery``, following the config."""

    def __init__(self, on_change: OnChange, registry: metrics.Registry) -> None:
        self.on_change = on_change
        self.registry = registry
        self._lookups: Lookups | None = None
        self._resolvers: tuple[Address, ...] | None = None
        self._tasks: dict[str, tuple[Spec, asyncio.Task[None]]] = {}

    def apply(self, config: Config, known: Discovered) -> None:
        """Follow ``config``: loops of removed groups stop, new or changed ones (re)start
        from the servers ``known`` for them; unchanged ones go on. New resolvers restart all."""
        if config.resolvers != self._resolvers:
            self._resolvers = config.resolvers
            self._lookups = Lookups(config.resolvers)
            self._stop(set(self._tasks))
        wanted = {g.name: g.discovery for g in config.server_groups if g.discovery is not None}
        self._stop({n for n, (spec, _) in self._tasks.items() if wanted.get(n) != spec})
        for name, spec in wanted.items():
            if name in self._tasks:
                continue
            entry = known.get(name)
            servers = entry[1] if entry is not None and entry[0] == spec else ()
            tracker = Tracker(f"discovery of {name} ({spec.dns})", spec.interval, servers)
            task = asyncio.get_running_loop().create_task(self._run(name, spec, tracker))
            self._tasks[name] = (spec, task)

    def _stop(self, names: set[str]) -> None:
        for name in names:
            _, task = self._tasks.pop(name)
            task.cancel()

    async def _run(self, group: str, spec: Spec, tracker: Tracker) -> None:
        lookups = self._lookups
        assert lookups is not None
        counts = self.registry.dns_lookups
        while True:
            try:
                answer = await (lookups.srv(spec) if spec.srv else lookups.addresses(spec))
            except Exception as exc:  # a resolver bug must not end discovery of the group
                log.exception("looking up %s failed unexpectedly", spec.dns)
                answer = Answer("error", detail=str(exc))
            key = (group, answer.result)
            counts[key] = counts.get(key, 0) + 1
            step = tracker.observe(answer)
            if step.message is not None:
                log.log(logging.WARNING if step.warning else logging.INFO, "%s", step.message)
            if step.servers is not None:
                try:
                    await self.on_change(group, spec, step.servers)
                except Exception:  # one bad apply must not end discovery of the group
                    log.exception("applying the servers found for %s failed", group)
            await asyncio.sleep(step.delay)

    async def close(self) -> None:
        tasks = [t for _, t in self._tasks.values()]
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


@functools.lru_cache(maxsize=4096)  # every reload asks again for every server
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve_names(servers: Iterable[ServerState]) -> None:
    """Give every server written with a host name the addresses that name has now (in the
    resolver's order, tried in turn by a connect). A name that does not resolve keeps the
    name itself (looked up at connect, as before) and is logged."""
    by_host: dict[str, list[ServerState]] = {}
    for s in servers:
        if not s.discovered and not _is_ip(s.address.host):
            by_host.setdefault(s.address.host, []).append(s)
    if not by_host:
        return
    loop = asyncio.get_running_loop()

    async def one(host: str) -> list[str]:
        async with asyncio.timeout(DEFAULT_DNS_TIMEOUT):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    hosts = list(by_host)
    found = await asyncio.gather(*(one(h) for h in hosts), return_exceptions=True)
    for host, ips in zip(hosts, found, strict=True):
        for s in by_host[host]:
            if isinstance(ips, BaseException) or not ips:
                s.connect_to = (s.address,)
            else:
                s.connect_to = tuple(Address(ip, s.address.port) for ip in ips)
        if isinstance(ips, BaseException):
            why = "timed out" if isinstance(ips, TimeoutError) else str(ips)
            log.warning(
                "server name %s does not resolve (%s): looked up at each connect", host, why
            )
