"""CLB's optional forwarding headers through a live proxy (issue 16), seen by a real backend:
X-Forwarded-Port is the listener's port, X-Forwarded-Client-Srcport the client's source
port, SLB-IP the listener address the client reached, SLB-ID the configured name; a client's
own values never reach the backend, whether the option is on or off, for HTTP requests and
WebSocket upgrades alike.
"""

from __future__ import annotations

import json

import aiohttp

from tests.support import config_doc, open_proxy, read_response

SPOOFS = (
    "X-Forwarded-Proto: gopher\r\n"
    "X-Forwarded-Port: 1\r\n"
    "X-Forwarded-Client-Srcport: 2\r\n"
    "SLB-IP: 6.6.6.6\r\n"
    "SLB-ID: evil\r\n"
    "slb-id: evil2\r\n"
)
OWNED = {"x-forwarded-port", "x-forwarded-client-srcport", "slb-ip", "slb-id"}


async def seen_by_backend(proxy, listener: str) -> tuple[list[tuple[str, str]], int]:
    """The headers the backend got for a request with spoofed values, and the client port."""
    reader, writer = await open_proxy(proxy, listener)
    client_port = writer.get_extra_info("sockname")[1]
    writer.write(f"GET /headers HTTP/1.1\r\nHost: chat.test\r\n{SPOOFS}\r\n".encode())
    resp = await read_response(reader)
    writer.close()
    assert resp.status == 200
    return [(k, v) for k, v in json.loads(resp.body)["headers"]], client_port


async def test_options_on_send_the_balancers_values_and_never_the_clients(make_backend, make_proxy):
    a = await make_backend("A")
    doc = config_doc(
        [a.address],
        listener={
            "bind": "127.0.0.2:0",  # not the client's address: SLB-IP must be the listener's
            "x_forwarded_port": True,
            "x_forwarded_client_srcport": True,
            "slb_ip": True,
            "slb_id": "lb-chat-01",
        },
    )
    doc["listeners"].append({"name": "plain", "bind": "127.0.0.1:0", "server_group": "rs1"})
    proxy = await make_proxy(doc)
    port = proxy.listeners.address("web").port

    seen, client_port = await seen_by_backend(proxy, "web")
    owned = [(k, v) for k, v in seen if k.lower() in OWNED | {"x-forwarded-proto"}]
    assert owned == [
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Port", str(port)),
        ("X-Forwarded-Client-Srcport", str(client_port)),
        ("SLB-IP", "127.0.0.2"),
        ("SLB-ID", "lb-chat-01"),
    ]
    assert dict(seen)["X-Forwarded-For"] == "127.0.0.1"

    # The same spoofs on a listener with the options off (the defaults): none passes.
    seen, _ = await seen_by_backend(proxy, "plain")
    assert not OWNED & {k.lower() for k, _ in seen}
    assert [v for k, v in seen if k.lower() == "x-forwarded-proto"] == ["http"]

    # A WebSocket upgrade carries them too, and a spoofed one is replaced.
    url = f"http://127.0.0.2:{port}/ws"
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(url, headers={"SLB-IP": "6.6.6.6", "X-Forwarded-Port": "1"})
        await ws.send_str("hi")
        assert (await ws.receive()).data == "hi"
        client_port = ws._response.connection.transport.get_extra_info("sockname")[1]
        await ws.close()
    method, path, got = a.requests[-1]
    assert (method, path) == ("GET", "/ws")
    assert got["SLB-IP"] == "127.0.0.2"
    assert got["X-Forwarded-Port"] == str(port)
    assert got["X-Forwarded-Client-Srcport"] == str(client_port)
    assert got["SLB-ID"] == "lb-chat-01"


async def test_x_forwarded_proto_off_passes_the_clients_and_on_replaces_it(
    make_backend, make_proxy
):
    a = await make_backend("A")
    doc = config_doc([a.address], listener={"x_forwarded_proto": False})
    doc["listeners"].append(
        {
            "name": "behind",  # behind a TLS terminator: only X-Forwarded-Proto is ours
            "bind": "127.0.0.1:0",
            "server_group": "rs1",
            "x_forwarded_for": False,
            "x_forwarded_proto": True,
        }
    )
    proxy = await make_proxy(doc)
    seen, _ = await seen_by_backend(proxy, "web")
    assert [v for k, v in seen if k == "X-Forwarded-Proto"] == ["gopher"]
    assert dict(seen)["X-Forwarded-For"] == "127.0.0.1"
    seen, _ = await seen_by_backend(proxy, "behind")
    assert [v for k, v in seen if k.lower() == "x-forwarded-proto"] == ["http"]
    assert "X-Forwarded-For" not in dict(seen)
