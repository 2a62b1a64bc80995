"""A real DNS server for tests: UDP on 127.0.0.1 port 0, records the test changes at will.

Built on dnspython's message code (the same library lbproxy resolves with, but the server
side: parsing queries, writing answers). It answers A, AAAA and SRV (the targets' addresses
in the additional section when it knows them, as Consul and dnsmasq do), NXDOMAIN for an
unknown name, an empty NOERROR answer for a known name without records of the type asked.
``mode`` makes it misbehave: ``drop`` (never answers: the client times out) or ``servfail``.
Every query is recorded with the loop time it arrived, so tests can see re-resolution pace.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class DnsServer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        # (name, type) -> (ttl, rdata texts), e.g. ("chat.test", "A") -> (1, ["127.0.0.2"])
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.mode = "answer"  # or "drop", "servfail"
        self.additional = True  # SRV answers carry their targets' addresses
        self.queries: list[tuple[str, str, float]] = []  # (name, type, loop time)
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    # ------------------------------------------------------------------ records
    def set(self, name: str, rdtype: str, values: list[str], ttl: int = 1) -> None:
        self.records[(_key(name), rdtype)] = (ttl, list(values))

    def remove(self, name: str, rdtype: str | None = None) -> None:
        for key in list(self.records):
            if key[0] == _key(name) and (rdtype is None or key[1] == rdtype):
                del self.records[key]

    def count(self, name: str, rdtype: str) -> int:
        return sum(1 for n, t, _ in self.queries if n == _key(name) and t == rdtype)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        assert self.transport is not None
        self.port = self.transport.get_extra_info("sockname")[1]
        return self

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    # ------------------------------------------------------------------ protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        q = query.question[0]
        name, rdtype = _key(q.name.to_text()), dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rdtype, asyncio.get_running_loop().time()))
        if self.mode == "drop":
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.mode == "servfail":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif not any(n == name for n, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif (name, rdtype) in self.records:
            ttl, values = self.records[(name, rdtype)]
            response.answer.append(self._rrset(name, rdtype, ttl, values))
            if rdtype == "SRV" and self.additional:
                self._additional(response, values)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)

    def _rrset(self, name: str, rdtype: str, ttl: int, values: list[str]) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(name + ".", ttl, "IN", rdtype, values)

    def _additional(self, response: dns.message.Message, srv_values: list[str]) -> None:
        for value in srv_values:
            target = _key(value.split()[-1])
            for rdtype in ("A", "AAAA"):
                if (target, rdtype) in self.records:
                    ttl, values = self.records[(target, rdtype)]
                    response.additional.append(self._rrset(target, rdtype, ttl, values))
