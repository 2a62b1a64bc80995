"""proxy/_accept.c, the compiled build's accept loop, and its Python path (the pure build):
both take what waits on a listening socket, up to a number, with the peer as socket.accept()
gives it, and say why they stopped (0: nothing more waits). The pure build has no C loop:
there the same C source is compiled by the test, and checked alike."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lbproxy import buildinfo
from lbproxy.proxy import acceptor as listener
from tests.support import compile_c_extension, expected_build

Accept = Callable[[int, int], tuple[list[tuple[int, Any]], int]]


def c_accept() -> Accept:
    if expected_build() != buildinfo.PURE:
        assert listener._c_accept is not None  # the compiled build loads it
        return listener._c_accept
    assert listener._c_accept is None  # the pure build takes the Python path
    module = compile_c_extension("_accept", listener.__file__)
    accept: Accept = module.accept
    return accept


def py_accept(fd: int, most: int) -> tuple[list[tuple[int, Any]], int]:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        # The Python loop takes ACCEPT_BATCH; the tests ask for at most that.
        assert most == listener.ACCEPT_BATCH
        return listener._py_accept(sock)
    finally:
        sock.close()


@pytest.fixture(params=["c", "python"])
def accept(request: pytest.FixtureRequest) -> Accept:
    return c_accept() if request.param == "c" else py_accept


@pytest.fixture
def server() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        s.setblocking(False)
        yield s


def test_takes_every_waiting_connection_with_its_peer(accept: Accept, server: socket.socket):
    clients = [socket.create_connection(server.getsockname()) for _ in range(5)]
    try:
        taken, error = accept(server.fileno(), listener.ACCEPT_BATCH)
        assert error == 0
        peers = sorted(peer for _, peer in taken)
        assert peers == sorted(c.getsockname() for c in clients)
        for fd, _ in taken:
            with socket.socket(fileno=fd) as conn:  # a real, open descriptor
                assert conn.getpeername() in peers
                assert not os.get_inheritable(fd)  # close-on-exec, as socket.accept() does
        assert accept(server.fileno(), listener.ACCEPT_BATCH) == ([], 0)  # none left
    finally:
        for c in clients:
            c.close()


def test_takes_at_most_the_number_asked(server: socket.socket):
    """(The C loop: the Python one always asks for ACCEPT_BATCH.)"""
    clients = [socket.create_connection(server.getsockname()) for _ in range(3)]
    try:
        taken, error = c_accept()(server.fileno(), 2)
        assert (len(taken), error) == (2, 0)
        rest, error = c_accept()(server.fileno(), 2)
        assert (len(rest), error) == (1, 0)
        for fd, _ in taken + rest:
            os.close(fd)
    finally:
        for c in clients:
            c.close()


def test_ipv6_peer_has_four_parts(accept: Accept):
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 (the loopback ::1 is needed)")
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        s.listen(4)
        s.setblocking(False)
        with socket.create_connection(s.getsockname()[:2]) as c:
            ((fd, peer),) = accept(s.fileno(), listener.ACCEPT_BATCH)[0]
            os.close(fd)
            assert peer == c.getsockname()
            assert len(peer) == 4


def test_an_error_is_given_back_not_raised(accept: Accept):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    s.setblocking(False)
    fd = s.fileno()
    with socket.create_connection(s.getsockname()):
        s.shutdown(socket.SHUT_RDWR)  # the socket listens no more: accept fails with EINVAL
        taken, error = accept(fd, listener.ACCEPT_BATCH)
    s.close()
    assert taken == [] and error == errno.EINVAL
