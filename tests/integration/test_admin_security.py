"""The admin listener, safe by default (issue 25), over real sockets: a write a browser could
send cross-site is refused (415 without the JSON content type, 403 with a foreign Origin) and
changes nothing; a foreign Host (DNS rebinding) gets 421; a bind off loopback needs a token
(``--check`` exit 2) unless ``insecure: true``, which is warned at every start and reload; the
token from a private file (rotated on reload) or an environment variable; ``token_for_reads``;
https on the admin with ``admin.tls``."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from lbproxy.control.app import Proxy
from lbproxy.control.loading import load_config
from tests.hardening import raw_config
from tests.integration.test_reload import ProxyProcess
from tests.pki import CA
from tests.support import free_port, raw_request, wait_for

ROOT = Path(__file__).resolve().parents[2]
JSON = {"Content-Type": "application/json"}
EVIL = "http://evil.example"


def write_config(path: Path, servers: list[str], **admin: Any) -> None:
    doc = raw_config(servers, admin={"bind": "127.0.0.1:0", **admin})
    path.write_text(yaml.safe_dump(doc))


def attempts(proxy: Proxy) -> int:
    """Reloads attempted so far (applied or failed)."""
    r = proxy.registry.reloads
    return r.success + r.failure


def check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbproxy", "--config", str(path), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


# ------------------------------------------------------------------ cross-site writes


async def test_cross_site_writes_are_refused(make_backend, make_proxy, make_admin, tmp_path):
    a = await make_backend("A")
    path = tmp_path / "lb.yaml"
    write_config(path, [a.address])
    proxy = await make_proxy(load_config(str(path)), str(path))
    admin = await make_admin(proxy)
    base = f"http://{admin.address}"
    server = f"{base}/-/servers/rs1/{a.address}"
    drain = b'{"admin_state": "drain"}'

    def state() -> str:
        return proxy.holder.current.groups["rs1"].servers[0].admin_state

    async with aiohttp.ClientSession() as s:
        # What a page on evil.example can send without a preflight: a "simple" request.
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            h = {"Origin": EVIL, "Content-Type": ctype}
            async with s.post(f"{base}/-/reload", data=b"{}", headers=h) as r:
                assert r.status in (403, 415), ctype
            async with s.put(server, data=drain, headers=h) as r:
                assert r.status in (403, 415), ctype
        # Without an Origin, a non-JSON write is still refused: 415, naming the fix.
        text = {"Content-Type": "text/plain"}
        async with s.post(f"{base}/-/reload", data=b"{}", headers=text) as r:
            assert r.status == 415
            assert "Content-Type: application/json" in (await r.json())["errors"][0]
        async with s.post(f"{base}/-/reload") as r:  # no body, no content type
            assert r.status == 415
        # JSON with a foreign Origin (a preflight would have been needed and refused): 403.
        for origin in (EVIL, "null", f"http://{admin.address.host}:1", f"https://{admin.address}"):
            h = {"Origin": origin, **JSON}
            async with s.post(f"{base}/-/reload", data=b"{}", headers=h) as r:
                assert r.status == 403, origin
            async with s.put(server, data=drain, headers=h) as r:
                assert r.status == 403, origin
        assert attempts(proxy) == 0 and state() == "ready"  # nothing reloaded or changed
        # The preflight itself: never granted, no CORS header at all.
        pre = {
            "Origin": EVIL,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        }
        async with s.options(f"{base}/-/reload", headers=pre) as r:
            assert r.status >= 400
            assert not [k for k in r.headers if k.lower().startswith("access-control-")]
        # The admin's own origin, or none (curl, scripts): served; an empty body or {}.
        same = {"Origin": base, **JSON}
        async with s.post(f"{base}/-/reload", data=b"", headers=same) as r:
            assert r.status == 200 and (await r.json())["result"] == "ok"
        async with s.post(f"{base}/-/reload", json={}) as r:
            assert r.status == 200
            assert not [k for k in r.headers if k.lower().startswith("access-control-")]
        async with s.post(f"{base}/-/reload", json={"force": True}) as r:
            assert r.status == 400 and "no parameters" in (await r.json())["errors"][0]
        async with s.put(server, data=drain, headers=JSON) as r:
            assert r.status == 200 and state() == "drain"
        async with s.get(f"{base}/status", headers={"Origin": EVIL}) as r:
            assert r.status == 200  # a read is not a write; the browser keeps its answer
            assert "Access-Control-Allow-Origin" not in r.headers
    assert attempts(proxy) == 2


async def test_curl_needs_the_json_content_type(make_backend, make_proxy, make_admin, tmp_path):
    a = await make_backend("A")
    path = tmp_path / "lb.yaml"
    write_config(path, [a.address])
    proxy = await make_proxy(load_config(str(path)), str(path))
    admin = await make_admin(proxy)
    url = f"http://{admin.address}/-/reload"

    async def curl(*args: str) -> str:
        p = await asyncio.create_subprocess_exec(
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            *args,
            url,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await p.communicate()
        return out.decode()

    assert await curl("-X", "POST") == "415"
    assert await curl("-X", "POST", "-H", "Content-Type: application/json") == "200"
    assert attempts(proxy) == 1


# ------------------------------------------------------------------ Host (DNS rebinding)


def get(path: str, host: str | None) -> bytes:
    head = f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
    return (head + "Connection: close\r\n\r\n").encode()


async def test_foreign_host_is_misdirected(make_backend, make_proxy, make_admin, tmp_path):
    a = await make_backend("A")
    path = tmp_path / "lb.yaml"
    write_config(path, [a.address], allowed_hosts=["lb-admin.internal", "[fd00::1]"])
    proxy = await make_proxy(load_config(str(path)), str(path))
    admin = await make_admin(proxy)
    assert admin.address is not None
    ip, port = admin.address.host, admin.address.port

    async def status_of(data: bytes) -> int:
        answer = await raw_request(ip, port, data)
        return int(answer.split(b" ", 2)[1])

    for page in ("/-/servers", "/status", "/metrics", "/"):
        for host in (f"evil.example:{port}", "evil.example", "127.0.0.1.evil.example"):
            assert await status_of(get(page, host)) == 421, (page, host)
        answer = await raw_request(ip, port, get(page, "evil.example:8404"))
        assert answer.endswith(b"\n") and b"evil.example" in answer  # a short, clear body
    allowed = (
        f"127.0.0.1:{port}",
        "127.0.0.1",
        "127.9.9.9:80",
        "localhost",
        f"LOCALHOST:{port}",
        "[::1]:8404",
        "lb-admin.internal",
        "lb-admin.internal.:9000",
    )
    for host in allowed:
        assert await status_of(get("/status", host)) == 200, host
    # HTTP/1.0 without a Host, from this machine: served.
    answer = await raw_request(ip, port, b"GET /status HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200")
    # A write with a foreign Host is refused before anything else.
    post = (
        f"POST /-/reload HTTP/1.1\r\nHost: evil.example:{port}\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    assert await status_of(post.encode()) == 421
    assert attempts(proxy) == 0


# ------------------------------------------------------------------ open bind, insecure


def open_doc(admin: dict[str, Any], port: int = 0) -> dict[str, Any]:
    return raw_config(["127.0.0.1:9"], admin={"bind": f"0.0.0.0:{port}", **admin})


def test_open_bind_without_token_is_a_config_error(tmp_path):
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(open_doc({})))
    done = check(path)
    assert done.returncode == 2, done.stderr
    for words in ("no token", "admin.token_file", "admin.token_env", "admin.insecure: true"):
        assert words in done.stderr
    for admin in ({"insecure": True}, {"token": "t0ken-0123456789"}, {"token_env": "LB_T"}):
        path.write_text(yaml.safe_dump(open_doc(admin)))
        done = check(path, {"LB_T": "from-the-env"})
        assert done.returncode == 0, (admin, done.stderr)


async def test_insecure_is_warned_at_start_and_every_reload(tmp_path):
    path = tmp_path / "lb.yaml"
    admin_port = free_port()
    doc = open_doc({"insecure": True}, admin_port)
    doc["listeners"][0]["bind"] = f"127.0.0.1:{free_port()}"
    path.write_text(yaml.safe_dump(doc))
    p = await ProxyProcess(path).start(admin_port)
    try:
        warning = "admin.insecure: the admin on 0.0.0.0"
        await wait_for(lambda: p.logged(warning) == 1, 10, "the warning at the start")
        async with aiohttp.ClientSession() as s:
            for n in (2, 3):
                async with s.post(f"{p.admin}/-/reload", json={}) as r:
                    assert r.status == 200
                await wait_for(lambda n=n: p.logged(warning) == n, 10, "the warning again")
    finally:
        assert await p.stop() == 0


# ------------------------------------------------------------------ token sources


async def test_token_file(make_backend, make_proxy, make_admin, tmp_path):
    a = await make_backend("A")
    token = tmp_path / "admin.token"
    token.write_text("first-t0ken\n")
    path = tmp_path / "lb.yaml"
    write_config(path, [a.address], token_file="admin.token")  # relative to the config file
    for mode in (0o644, 0o640, 0o604, 0o660):
        token.chmod(mode)
        done = check(path)
        assert done.returncode == 2
        assert "chmod 600" in done.stderr and f"{mode:04o}" in done.stderr
        assert "first-t0ken" not in done.stderr  # never echoed
    token.chmod(0o600)
    assert check(path).returncode == 0
    proxy = await make_proxy(load_config(str(path)), str(path))
    admin = await make_admin(proxy)
    url = f"http://{admin.address}/-/reload"
    async with aiohttp.ClientSession() as s:

        async def reload(tok: str) -> int:
            async with s.post(url, json={}, headers={"Authorization": f"Bearer {tok}"}) as r:
                return r.status

        assert proxy.holder.current.config.admin.token == "first-t0ken"  # no newline
        assert await reload("first-t0ke") == 401
        assert await reload("first-t0ken") == 200
        token.write_text("second-t0ken\n")  # rotated: picked up by the reload
        assert await reload("first-t0ken") == 200
        assert await reload("first-t0ken") == 401
        assert await reload("second-t0ken") == 200
        token.write_text("")
        assert await reload("second-t0ken") == 400  # an empty file fails the reload
        assert await reload("second-t0ken") == 400
        assert "is empty" in proxy.last_reload[2]
    assert "second-t0ken" not in repr(proxy.holder.current.config)


def test_token_file_errors(tmp_path):
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(open_doc({"token_file": str(tmp_path / "nope")})))
    done = check(path)
    assert done.returncode == 2 and "admin.token_file: cannot read" in done.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    path.write_text(yaml.safe_dump(open_doc({"token_file": str(empty)})))
    done = check(path)
    assert done.returncode == 2 and "is empty" in done.stderr


async def test_token_env(make_backend, make_proxy, make_admin, tmp_path, monkeypatch):
    a = await make_backend("A")
    path = tmp_path / "lb.yaml"
    write_config(path, [a.address], token_env="LB_ADMIN_TEST_TOKEN")
    monkeypatch.delenv("LB_ADMIN_TEST_TOKEN", raising=False)
    done = check(path)
    assert done.returncode == 2
    assert "LB_ADMIN_TEST_TOKEN is not set or empty" in done.stderr
    assert check(path, {"LB_ADMIN_TEST_TOKEN": ""}).returncode == 2
    monkeypatch.setenv("LB_ADMIN_TEST_TOKEN", "env-t0ken")
    proxy = await make_proxy(load_config(str(path)), str(path))
    admin = await make_admin(proxy)
    url = f"http://{admin.address}/-/servers"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 401
        async with s.get(url, headers={"Authorization": "Bearer env-t0ken"}) as r:
            assert r.status == 200


async def test_token_for_reads(make_backend, make_proxy, make_admin, tmp_path):
    a = await make_backend("A")
    path = tmp_path / "lb.yaml"
    write_config(path, [a.address], token="read-t0ken", token_for_reads=True)
    proxy = await make_proxy(load_config(str(path)), str(path))
    admin = await make_admin(proxy)
    base = f"http://{admin.address}"
    auth = {"Authorization": "Bearer read-t0ken"}
    async with aiohttp.ClientSession() as s:
        for page in ("/", "/status", "/metrics", "/-/servers"):
            async with s.get(base + page) as r:
                assert r.status == 401, page
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            async with s.get(base + page, headers=auth) as r:
                assert r.status == 200, page
        async with s.get(base + "/healthz") as r:
            assert r.status == 200  # a liveness probe needs no token
    # Without token_for_reads, only the listing needs it.
    write_config(path, [a.address], token="read-t0ken")
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/-/reload", json={}, headers=auth) as r:
            assert r.status == 200
        for page, wanted in (("/status", 200), ("/metrics", 200), ("/-/servers", 401)):
            async with s.get(base + page) as r:
                assert r.status == wanted, page


# ------------------------------------------------------------------ TLS


async def test_admin_over_tls(make_backend, make_proxy, make_admin, tmp_path):
    a = await make_backend("A")
    ca = CA(str(tmp_path))
    leaf = ca.issue("admin", "lbproxy admin", dns=("localhost",), ips=("127.0.0.1",))
    path = tmp_path / "lb.yaml"
    write_config(path, [a.address], tls={"cert": leaf.cert, "key": leaf.key})
    proxy = await make_proxy(load_config(str(path)), str(path))
    admin = await make_admin(proxy)
    proxy.admin = admin  # a reload gives it the renewed certificate
    assert admin.url.startswith("https://")
    trust = ssl.create_default_context(cafile=ca.cert)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{admin.url}/status", ssl=trust) as r:
            assert r.status == 200
        same = {"Origin": admin.url, **JSON}
        async with s.post(f"{admin.url}/-/reload", data=b"{}", headers=same, ssl=trust) as r:
            assert r.status == 200
        plain = {"Origin": f"http://{admin.address}", **JSON}  # another scheme: foreign
        async with s.post(f"{admin.url}/-/reload", data=b"{}", headers=plain, ssl=trust) as r:
            assert r.status == 403
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"http://{admin.address}/status") as r:
                await r.read()
        # A renewed certificate is served after a reload.
        old_der = await peer_cert(admin.address.host, admin.address.port)
        ca.issue("admin", "lbproxy admin renewed", ips=("127.0.0.1",))
        async with s.post(f"{admin.url}/-/reload", json={}, ssl=trust) as r:
            assert r.status == 200 and (await r.json())["changed"]
        await wait_for(lambda: admin.site is not None, 5, "the admin listening again")
        assert await peer_cert(admin.address.host, admin.address.port) != old_der
        async with s.get(f"{admin.url}/status", ssl=trust) as r:
            assert r.status == 200
    bad = tmp_path / "bad.yaml"
    write_config(bad, [a.address], tls={"cert": str(tmp_path / "missing.pem"), "key": leaf.key})
    done = check(bad)
    assert done.returncode == 2 and "admin.tls" in done.stderr


async def peer_cert(host: str, port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(host, port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)
    finally:
        writer.close()
