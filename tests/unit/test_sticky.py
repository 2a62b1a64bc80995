"""Session persistence helpers: server tokens, cookies, Engine.IO sids and pin tables."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

import pytest
from engineio import packet as eio_packet
from engineio import payload as eio_payload

from lbproxy.config import StickySession
from lbproxy.core.sticky import (
    DEFAULT_MAX_ENTRIES,
    HANDSHAKE_PROBE_LIMIT,
    MAX_KEY_LENGTH,
    Affinity,
    CookieMap,
    PinTable,
    SidTable,
    find_cookie,
    is_socketio,
    response_set_cookie,
    server_token,
    set_cookie_header,
    sid_from_handshake,
    sid_from_query,
    token_map,
)

# --- server_token ---------------------------------------------------------------------------


def test_server_token_is_16_hex_digits_and_hides_the_address() -> None:
    token = server_token("rs1/10.0.0.7:8080")
    assert len(token) == 16
    assert int(token, 16) >= 0
    assert token == token.lower()
    assert "10.0.0.7" not in token and "8080" not in token


def test_server_token_is_stable_and_distinct() -> None:
    ids = [f"rs1/10.0.0.{i}:80" for i in range(200)] + ["rs2/10.0.0.1:80"]
    tokens = [server_token(i) for i in ids]
    assert tokens == [server_token(i) for i in ids]
    assert len(set(tokens)) == len(ids)


def test_server_token_is_the_same_in_another_process() -> None:
    ids = ["rs1/127.0.0.1:5001", "rs1/[::1]:5002", "grp/host.example:80"]
    code = (
        "import json, sys; from lbproxy.core.sticky import server_token; "
        "print(json.dumps([server_token(i) for i in json.loads(sys.argv[1])]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(ids)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONHASHSEED": "12345"},  # a different str hash seed: must not matter
    )
    assert json.loads(out.stdout) == [server_token(i) for i in ids]


def test_server_token_known_value() -> None:
    # Pinned: changing the derivation would re-pin every client after an upgrade.
    import hashlib

    expected = hashlib.blake2b(b"rs1/127.0.0.1:5001", key=b"lbproxy-sticky", digest_size=8)
    assert server_token("rs1/127.0.0.1:5001") == expected.hexdigest()


def test_token_map() -> None:
    ids = ["rs1/a:1", "rs1/b:2"]
    assert token_map(ids) == {
        server_token("rs1/a:1"): "rs1/a:1",
        server_token("rs1/b:2"): "rs1/b:2",
    }
    assert token_map([]) == {}


# --- find_cookie ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"Cookie", b"SERVERID=abc")], "abc"),
        ([(b"cookie", b"a=1; SERVERID=abc; b=2")], "abc"),
        ([(b"COOKIE", b"a=1;SERVERID=abc;b=2")], "abc"),
        ([(b"Cookie", b"  SERVERID =  abc  ")], "abc"),
        ([(b"Cookie", b'SERVERID="abc"')], "abc"),
        ([(b"Cookie", b'SERVERID=""')], ""),
        ([(b"Cookie", b"SERVERID=")], ""),
        ([(b"Cookie", b"a=1"), (b"Cookie", b"SERVERID=second")], "second"),
        ([(b"Cookie", b"SERVERID=first"), (b"Cookie", b"SERVERID=second")], "first"),
        ([(b"Cookie", b"SERVERID=x=y")], "x=y"),
        ([(b"Cookie", b"serverid=lower")], None),
        ([(b"Cookie", b"XSERVERID=abc; SERVERIDX=def")], None),
        ([(b"Cookie", b"SERVERID")], None),
        ([(b"Cookie", b";;; ;")], None),
        ([(b"Cookie", b"")], None),
        ([(b"Set-Cookie", b"SERVERID=abc")], None),
        ([(b"X-Cookie", b"SERVERID=abc")], None),
        ([(b"Host", b"h"), (b"Cookies", b"SERVERID=abc")], None),
        ([], None),
        ([(b"Cookie", b"SERVERID=\xe9t\xe9")], "\xe9t\xe9"),
    ],
)
def test_find_cookie(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert find_cookie(headers, "SERVERID") == expected


# --- set_cookie_header ----------------------------------------------------------------------


def test_set_cookie_header() -> None:
    assert set_cookie_header("SERVERID", "0123abcd", 1000.0) == (
        b"SERVERID=0123abcd; Max-Age=1000; Path=/; HttpOnly; SameSite=Lax"
    )
    assert set_cookie_header("lb", "v", 0.2, path="/app") == (
        b"lb=v; Max-Age=1; Path=/app; HttpOnly; SameSite=Lax"
    )
    assert set_cookie_header("lb", "", 0) == b"lb=; Max-Age=0; Path=/; HttpOnly; SameSite=Lax"
    assert set_cookie_header("lb", "v", -5) == b"lb=v; Max-Age=0; Path=/; HttpOnly; SameSite=Lax"


def test_set_cookie_header_round_trips_through_find_cookie() -> None:
    value = set_cookie_header("SERVERID", server_token("rs1/h:1"), 60)
    pair = value.split(b";", 1)[0]
    assert find_cookie([(b"Cookie", b"other=1; " + pair)], "SERVERID") == server_token("rs1/h:1")


@pytest.mark.parametrize(
    ("name", "value", "path"),
    [
        ("bad name", "v", "/"),
        ("a;b", "v", "/"),
        ("", "v", "/"),
        ("n", "v;Domain=evil", "/"),
        ("n", "v\r\nX: y", "/"),
        ("n", "a b", "/"),
        ("n", 'a"b', "/"),
        ("n", "v", "relative"),
        ("n", "v", "/a;b"),
        ("n", "v", "/a\r\n"),
    ],
)
def test_set_cookie_header_refuses_unsafe_input(name: str, value: str, path: str) -> None:
    with pytest.raises(ValueError):
        set_cookie_header(name, value, 10, path=path)


# --- response_set_cookie --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"Set-Cookie", b"sid=s1; Path=/; HttpOnly")], "s1"),
        ([(b"set-cookie", b"sid=s1")], "s1"),
        ([(b"Set-Cookie", b'sid="quoted"; Secure')], "quoted"),
        ([(b"Set-Cookie", b" sid = s1 ; Path=/")], "s1"),
        ([(b"Set-Cookie", b"other=1"), (b"Set-Cookie", b"sid=s2; Max-Age=60")], "s2"),
        ([(b"Set-Cookie", b"sid=first"), (b"Set-Cookie", b"sid=last")], "last"),
        ([(b"Set-Cookie", b"sid=; Max-Age=0")], None),
        ([(b"Set-Cookie", b"sid=deleted; Max-Age=0")], None),
        ([(b"Set-Cookie", b"sid=deleted; max-age=-1")], None),
        ([(b"Set-Cookie", b"sid=v; Max-Age=soon")], "v"),  # invalid Max-Age is ignored
        ([(b"Set-Cookie", b"sid=v; Expires=Thu, 01 Jan 2099 00:00:00 GMT")], "v"),
        ([(b"Set-Cookie", b"sid=a"), (b"Set-Cookie", b"sid=; Max-Age=0")], None),
        ([(b"Set-Cookie", b"sid=a; Max-Age=0"), (b"Set-Cookie", b"sid=b")], "b"),
        ([(b"Set-Cookie", b"SID=upper")], None),
        ([(b"Set-Cookie", b"sidx=1"), (b"Set-Cookie", b"xsid=2")], None),
        ([(b"Set-Cookie", b"garbage")], None),
        ([(b"Cookie", b"sid=request-side")], None),
        ([], None),
    ],
)
def test_response_set_cookie(headers: list[tuple[bytes, bytes]], expected: str | None) -> None:
    assert response_set_cookie(headers, "sid") == expected


# --- Socket.IO / Engine.IO ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/socket.io/?EIO=4&transport=polling&t=Nx&sid=AbC-_12", "AbC-_12"),
        (b"/socket.io/?sid=first&sid=second", "first"),
        (b"/socket.io/?EIO=4&transport=websocket&sid=a%2Bb%3D", "a+b="),
        (b"/socket.io/?sid=x#frag", "x"),
        (b"/socket.io/?EIO=4&transport=polling", None),
        (b"/socket.io/?EIO=4&sid=", None),
        (b"/socket.io/?xsid=1&asid=2", None),
        (b"/socket.io/sid=1", None),
        (b"/socket.io/", None),
        (b"/?sid=" + b"a" * MAX_KEY_LENGTH, "a" * MAX_KEY_LENGTH),
        (b"/?sid=" + b"a" * (MAX_KEY_LENGTH + 1), None),
        (b"/?sid=%zz", "%zz"),
        (b"", None),
    ],
)
def test_sid_from_query(target: bytes, expected: str | None) -> None:
    assert sid_from_query(target) == expected


@pytest.mark.parametrize(
    ("target", "path", "expected"),
    [
        (b"/socket.io/?EIO=4&transport=polling", "/socket.io/", True),
        (b"/socket.io/", "/socket.io/", True),
        (b"/socket.io", "/socket.io/", True),
        (b"/socket.io?EIO=4", "/socket.io/", True),
        (b"/socket.io/?EIO=4", "/socket.io", True),
        (b"/socket.iox/?EIO=4", "/socket.io/", False),
        (b"/socket.iox", "/socket.io", False),
        (b"/api/socket.io/", "/socket.io/", False),
        (b"/", "/socket.io/", False),
        (b"/?path=/socket.io/", "/socket.io/", False),
        (b"/chat/engine.io/?sid=1", "/chat/engine.io/", True),
        (b"http://h/socket.io/?EIO=3", "/socket.io/", True),
        (b"/anything", "/", True),
        (b"/SOCKET.IO/", "/socket.io/", False),
    ],
)
def test_is_socketio(target: bytes, path: str, expected: bool) -> None:
    assert is_socketio(target, path) is expected


OPEN = {"sid": "Lbo5JLzTotvW3g2LAAAA", "upgrades": ["websocket"], "pingInterval": 25000}


def test_sid_from_real_engineio_v4_handshake() -> None:
    # The exact bytes python-engineio's server writes for a polling handshake.
    first = eio_packet.Packet(eio_packet.OPEN, OPEN)
    body = eio_payload.Payload(packets=[first]).encode().encode()
    assert body.startswith(b'0{"sid":')
    assert sid_from_handshake(body) == OPEN["sid"]
    second = eio_packet.Packet(eio_packet.MESSAGE, '0{"sid":"socket-level"}')
    body = eio_payload.Payload(packets=[first, second]).encode().encode()
    assert b"\x1e" in body
    assert sid_from_handshake(body) == OPEN["sid"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'0{"sid":"abc","upgrades":[]}', "abc"),
        (b'0{"sid":"abc"}\x1e40{"sid":"other"}', "abc"),
        (b'0{"sid":"abc"} trailing', "abc"),
        (b'0{"upgrades":[],"sid":"late"}', "late"),
        (b'0{"sid":"\\u00e9t\\u00e9"}', "\u00e9t\u00e9"),
        # Engine.IO v3 text payloads: <length in characters>:<packet>, more packets may follow.
        (
            b'96:0{"sid":"v3sid","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":60000}',
            "v3sid",
        ),
        (b'16:0{"sid":"v3sid"}2:40', "v3sid"),
        ('17:0{"sid":"\u00e9t\u00e9"}2:40'.encode(), "\u00e9t\u00e9"),
        # v3 binary payload: 0x00 (string), length digits as bytes, 0xff, the packet.
        (b'\x00\x01\x06\xff0{"sid":"v3bin"}\x00\x02\xff40', "v3bin"),
    ],
)
def test_sid_from_handshake(body: bytes, expected: str) -> None:
    assert sid_from_handshake(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"0",
        b"0{",
        b'0{"sid":',
        b'0{"sid":"unterminated',
        b'0{"sid":""}',
        b'0{"sid":123}',
        b'0{"sid":null}',
        b'0{"nosid":"x"}',
        b'0["sid","x"]',
        b'0"sid"',
        b'40{"sid":"socket-level-not-engine"}',
        b"2:40",
        b'1:0{"sid":"x"}',  # length cuts the JSON short
        b'99999999999999:0{"sid":"x"}',
        b':0{"sid":"x"}',
        b'12x:0{"sid":"x"}',
        b'\x00\xff0{"sid":"x"}',
        b"\x00\x01\x05",
        b'\x01\x01\x05\xff0{"sid":"x"}',  # a binary packet is no open packet
        b'\x00\x01\x0a\xff0{"sid":"x"}',
        b'{"code":1,"message":"Session ID unknown"}',
        b'"Session ID unknown"',
        b"<html>Bad Gateway</html>",
        b'___eio[0]("0{\\"sid\\":\\"x\\"}");',
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00",  # gzip
        b'0{"sid":"\xff\xfe"}',
        b'0{"sid":"' + b"a" * (MAX_KEY_LENGTH + 1) + b'"}',
        b"0{" + b'"a":[' * 100_000,  # deep nesting: no RecursionError escapes
    ],
)
def test_sid_from_handshake_rejects_garbage(body: bytes) -> None:
    assert sid_from_handshake(body) is None


def test_sid_from_handshake_looks_at_a_bounded_prefix() -> None:
    padded = b'0{"pad":"' + b"x" * 200_000 + b'","sid":"late"}'
    assert sid_from_handshake(padded) is None
    assert sid_from_handshake(b'0{"sid":"early","pad":"' + b"x" * 200_000 + b'"}') is None


# --- pin tables -----------------------------------------------------------------------------


def test_learn_and_lookup() -> None:
    t = SidTable()
    assert t.lookup("s1", 0.0) is None
    t.learn("s1", "rs1/a:1", now=0.0, ttl=10.0)
    t.learn("s2", "rs1/b:2", now=0.0, ttl=10.0)
    assert t.lookup("s1", 1.0) == "rs1/a:1"
    assert t.lookup("s2", 1.0) == "rs1/b:2"
    assert "s1" in t and "s3" not in t
    assert len(t) == 2


def test_relearn_replaces_the_server() -> None:
    t = CookieMap()
    t.learn("v", "rs1/a:1", 0.0, 10.0)
    t.learn("v", "rs1/b:2", 1.0, 10.0)
    assert t.lookup("v", 2.0) == "rs1/b:2"
    assert len(t) == 1


def test_entry_expires_after_idle_ttl() -> None:
    t = SidTable()
    t.learn("s", "srv", now=100.0, ttl=5.0)
    assert t.lookup("s", 104.0) == "srv"  # expiry pushed to 109
    assert t.lookup("s", 108.0) == "srv"  # -> 113, past the first expiry at 105
    assert t.lookup("s", 112.0) == "srv"  # -> 117
    assert t.lookup("s", 117.0) is None  # idle for exactly ttl: expired
    assert len(t) == 0  # dropped on the failed lookup
    assert t.lookup("s", 117.5) is None


def test_unused_entry_expires_at_ttl() -> None:
    t = SidTable()
    t.learn("s", "srv", now=0.0, ttl=5.0)
    assert t.lookup("s", 5.0) is None


def test_forget() -> None:
    t = SidTable()
    t.learn("s", "srv", 0.0, 10.0)
    t.forget("s")
    t.forget("s")  # twice: no error
    t.forget("never")
    assert t.lookup("s", 1.0) is None
    assert len(t) == 0


def test_forget_server() -> None:
    t = CookieMap()
    for i in range(10):
        t.learn(f"k{i}", "dead" if i % 3 == 0 else "alive", 0.0, 10.0)
    assert t.forget_server("dead") == 4
    assert len(t) == 6
    assert t.lookup("k0", 1.0) is None
    assert t.lookup("k1", 1.0) == "alive"
    assert t.forget_server("nobody") == 0


def test_expire_removes_only_expired_entries() -> None:
    t = SidTable()
    for i in range(10):
        t.learn(f"s{i}", "srv", now=float(i), ttl=10.0)  # s{i} expires at i + 10
    assert t.expire(now=10.0) == 1  # s0
    assert t.expire(now=14.5) == 4  # s1..s4
    assert len(t) == 5
    assert t.lookup("s5", 14.5) == "srv"  # refreshed to 24.5
    assert t.expire(now=19.0) == 4  # s6..s9, not s5
    assert [t.lookup("s5", 19.0)] == ["srv"]
    assert t.expire(now=1000.0) == 1
    assert len(t) == 0
    assert t.expire(now=2000.0) == 0


def test_expire_work_is_bounded() -> None:
    t = SidTable()
    for i in range(2500):
        t.learn(f"s{i}", "srv", 0.0, 1.0)
    assert t.expire(5.0, limit=1000) == 1000
    assert len(t) == 1500
    assert t.expire(5.0) == 1000  # the default limit
    assert t.expire(5.0, limit=10_000) == 500
    assert len(t) == 0


def test_expire_with_mixed_ttls_never_serves_stale_entries() -> None:
    t = SidTable()
    t.learn("long", "srv", 0.0, 100.0)
    t.learn("short", "srv", 0.0, 1.0)
    assert t.expire(50.0) == 0  # the oldest entry is alive: expire stops there
    assert t.lookup("short", 50.0) is None  # but lookup never returns an expired entry
    assert t.lookup("long", 50.0) == "srv"


def test_eviction_drops_the_least_recently_used() -> None:
    t = SidTable(max_size=3)
    t.learn("a", "1", 0.0, 100.0)
    t.learn("b", "2", 0.0, 100.0)
    t.learn("c", "3", 0.0, 100.0)
    assert t.lookup("a", 1.0) == "1"  # "a" is now the most recently used
    t.learn("d", "4", 2.0, 100.0)
    assert len(t) == 3
    assert "b" not in t
    assert [t.lookup(k, 3.0) for k in "acd"] == ["1", "3", "4"]
    t.learn("c", "33", 4.0, 100.0)  # relearning an existing key evicts nothing
    assert len(t) == 3
    t.learn("e", "5", 5.0, 100.0)
    assert "a" not in t and {"c", "d", "e"} == {k for k in "acde" if k in t}


def test_default_max_size_and_validation() -> None:
    assert DEFAULT_MAX_ENTRIES == 100_000
    assert SidTable().max_size == DEFAULT_MAX_ENTRIES
    with pytest.raises(ValueError):
        PinTable(max_size=0)


def test_default_max_size_is_enforced() -> None:
    t = CookieMap()
    for i in range(DEFAULT_MAX_ENTRIES + 5):
        t.learn(str(i), "srv", 0.0, 10.0)
    assert len(t) == DEFAULT_MAX_ENTRIES
    assert "4" not in t and "5" in t
    assert str(DEFAULT_MAX_ENTRIES + 4) in t


def test_learning_reclaims_expired_entries_without_expire_calls() -> None:
    t = SidTable()
    for i in range(100):
        t.learn(f"old{i}", "srv", 0.0, 1.0)
    for i in range(60):
        t.learn(f"new{i}", "srv", 10.0, 1.0)  # each new key drops up to two expired ones
    assert len(t) == 60
    assert not any(f"old{i}" in t for i in range(100))


# --- Affinity: one request's routing decisions -----------------------------------------------

_IO = "/socket.io/?EIO=4&transport=polling"


def _affinity(
    kind: str | None,
    target: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
    socketio: bool = True,
) -> tuple[Affinity, SidTable, CookieMap]:
    sids, cookies = SidTable(), CookieMap()
    cfg = StickySession(type=kind, cookie="lb", cookie_timeout=60.0, socketio=socketio)
    return Affinity(cfg, sids, cookies, target.encode(), list(headers)), sids, cookies


def test_affinity_prefers_the_sid_pin_then_the_insert_token() -> None:
    by_id = {"g/a": "A", "g/b": "B"}
    by_token = {server_token("g/a"): "A", server_token("g/b"): "B"}
    cookie = [(b"Cookie", f"lb={server_token('g/b')}".encode())]
    aff, sids, _ = _affinity("insert", f"{_IO}&sid=s1", cookie)
    sids.learn("s1", "g/a", 0.0, 10.0)
    assert aff.pinned(cookie, by_id, by_token, 1.0) == "A" and not aff.hunt
    aff, sids, _ = _affinity("insert", f"{_IO}&sid=s2", cookie)  # a sid this process never saw
    assert aff.pinned(cookie, by_id, by_token, 1.0) == "B" and aff.hunt
    aff, _, _ = _affinity("insert", "/other?sid=s1", cookie)  # not under the Socket.IO path
    assert (aff.sio, aff.sid, aff.pinned(cookie, by_id, by_token, 1.0)) == (False, None, "B")
    aff, _, _ = _affinity("insert", "/", [(b"Cookie", b"lb=0000000000000000")])
    assert aff.pinned([], by_id, by_token, 1.0) is None  # a token of no known server


def test_affinity_server_cookie_is_learnt_from_the_response_and_read_back() -> None:
    aff, _, cookies = _affinity("server", "/", socketio=False)
    set_cookie = [(b"Set-Cookie", b"lb=v1; Path=/")]
    assert aff.response(200, set_cookie, "g/a", "t", 5.0) == ()
    assert cookies.lookup("v1", 6.0) == "g/a"
    sent = [(b"cookie", b"x=1; lb=v1")]
    again, _, _ = _affinity("server", "/", sent, socketio=False)
    again.cookies = cookies
    assert again.pinned(sent, {"g/a": "A"}, {}, 7.0) == "A"


def test_affinity_insert_sets_the_cookie_only_when_the_server_changes() -> None:
    token = server_token("g/a")
    aff, _, _ = _affinity("insert", "/", [(b"Cookie", f"lb={token}".encode())])
    assert aff.response(200, [], "g/a", token, 0.0) == ()
    (line,) = aff.response(200, [], "g/b", server_token("g/b"), 0.0)
    assert line.startswith(b"Set-Cookie: lb=" + server_token("g/b").encode() + b"; Max-Age=60")


def test_affinity_reads_the_handshake_sid_as_the_body_passes() -> None:
    aff, sids, _ = _affinity(None, _IO)
    assert aff.response(200, [], "g/a", "t", 0.0) == () and aff.probe is not None
    body = b'0{"sid":"abc","upgrades":["websocket"],"pingInterval":25000}'
    aff.read_handshake(body[:10], False, "g/a", 1.0, 30.0)
    assert aff.probe is not None and "abc" not in sids
    aff.read_handshake(body[10:], False, "g/a", 1.0, 30.0)
    assert aff.probe is None and sids.lookup("abc", 2.0) == "g/a"
    chunked, sids2, _ = _affinity(None, _IO)
    chunked.response(200, [], "g/b", "t", 0.0)
    chunked.read_handshake(b"%x\r\n" % len(body) + body + b"\r\n", True, "g/b", 1.0, 30.0)
    assert sids2.lookup("abc", 2.0) == "g/b"
    gives_up, _, _ = _affinity(None, _IO)
    gives_up.response(200, [], "g/a", "t", 0.0)
    gives_up.read_handshake(b"x" * (HANDSHAKE_PROBE_LIMIT + 1), False, "g/a", 1.0, 30.0)
    assert gives_up.probe is None


def test_affinity_hunt_pins_the_first_server_that_does_not_say_400() -> None:
    aff, sids, _ = _affinity(None, f"{_IO}&sid=lost")
    assert aff.pinned([], {}, {}, 0.0) is None and aff.hunt
    assert aff.hunt_answer(400, "g/a", 1.0, 30.0) is True and aff.hunt
    assert "lost" not in sids
    assert aff.hunt_answer(200, "g/b", 1.0, 30.0) is False and not aff.hunt
    assert sids.lookup("lost", 2.0) == "g/b"
    aff.response(400, [], "g/b", "t", 3.0)  # "Session ID unknown": the session is over
    assert "lost" not in sids
    sids.learn("lost", "g/b", 4.0, 30.0)
    aff.tunnel_closed(object())
    assert "lost" not in sids
